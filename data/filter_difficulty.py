"""Difficulty filtering as the paper did it (spec 5.5): roll out k times per prompt with the current
policy and keep the prompts it solves sometimes but not always (0 < correct < k).

python data/filter_difficulty.py --k 24 --out DIR -- stage=rlvr tokenizer=... policy.init_from=MODEL \
    [prompts.root=... | prompts.train=PATHS] [rollout=vllm] [rollout.max_new_tokens=...]
python data/filter_difficulty.py --k 8 --out outputs/filtered -- stage=rlvr model=tiny processor=tiny \
    tokenizer=tiny policy.init_from=outputs/demo/sft_hf rollout.max_new_tokens=64     # the CPU

Everything after `--` is a Hydra override of the RL config (configs/rl.yaml): the prompts, the engine, the
sampling and the rewards are the RL stage's own. Each source is read once. Kept samples are written as
shards with a manifest; `difficulty.jsonl` has every prompt's count of correct responses. A response
whose reward could not be computed (timeout, error) counts for neither side. The last line printed is a
JSON summary.
"""

import argparse
import json
import sys
from collections import Counter, defaultdict
from dataclasses import replace
from pathlib import Path

from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from tqdm import tqdm

from rl.config import RLConfig
from rl.engines import build_rollout_engine, engine_options
from rl.iteration import group_responses, sampling_params, score_rewards
from rl.preflight import check_weights
from rl.prompts import PromptLoader
from rl.rewards import RewardScorer
from step3vl_train.data.encoding import image_suffix
from step3vl_train.data.shards import ShardSetWriter
from step3vl_train.processing.processor import load_processor
from step3vl_train.train.recipes import register_recipes
from step3vl_train.usage import UsageError

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--k", type=int, default=24, help="rollouts per prompt")
    parser.add_argument("--out", required=True)
    parser.add_argument("--batch-prompts", type=int, default=32, help="prompts per generate call")
    parser.add_argument("--solved-at", type=float, default=1.0, help="a reward at least this counts as correct")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides of configs/rl.yaml")
    args = parser.parse_args()
    register_recipes()
    with initialize_config_dir(str(CONFIGS), version_base="1.3"):
        raw = OmegaConf.to_container(compose("rl", args.overrides), resolve=True)
    try:
        cfg = RLConfig.from_dict(raw)
        check_weights(cfg)
    except UsageError as error:
        sys.exit(f"filter_difficulty.py: {error}")
    processor = load_processor(cfg.tokenizer, cfg.processor or None)
    loader = PromptLoader(cfg.prompts, processor, cfg.reward.fn, max_epochs=1)
    tokenizer = processor.tokenizer
    engine = build_rollout_engine(cfg.rollout.engine, **engine_options(cfg, tokenizer.pad_token_id or 0, True))
    sampling = replace(sampling_params(cfg, processor), n=args.k)
    scorer = RewardScorer(cfg.reward)
    out = Path(args.out)
    writer = ShardSetWriter(str(out))
    kept, seen, by_task = 0, 0, defaultdict(Counter)
    progress = tqdm(desc="prompts", unit="prompt")
    with (out / "difficulty.jsonl").open("w") as log:
        for batch_index in range(1 << 62):
            prompts = loader.next_batch(args.batch_prompts)
            if not prompts:
                break
            completions = engine.generate(prompts, sampling, seed=batch_index)
            results = group_responses(prompts, completions)
            score_rewards(scorer, results, tokenizer.decode, sampling.stop_token_ids)
            for index, prompt in enumerate(prompts):
                group = [r for r in results[index * args.k : (index + 1) * args.k] if r.valid]
                correct = sum(r.reward >= args.solved_at for r in group)
                keep = 0 < correct < len(group)
                by_task[prompt.task]["kept" if keep else ("all" if group and correct == len(group) else "none")] += 1
                log.write(json.dumps({"key": prompt.key, "task": prompt.task, "correct": correct,
                                      "scored": len(group), "k": args.k, "kept": keep}) + "\n")  # fmt: skip
                if keep:
                    record = {"messages": prompt.messages, "answer": prompt.answer, "reward": prompt.reward}
                    record |= {k: v for k, v in (("boxes", prompt.boxes), ("points", prompt.points)) if v}
                    suffixes = [image_suffix(prompt.key, data) for data in prompt.images]
                    writer.write(prompt.key.rsplit(":", 1)[-1], record, prompt.images, suffixes)
                    kept += 1
            seen += len(prompts)
            progress.update(len(prompts))
    writer.close()
    scorer.close()
    progress.close()
    summary = {"prompts": seen, "kept": kept, "skipped": dict(loader.skips), "by_task": by_task}
    print(json.dumps(summary, default=dict))


if __name__ == "__main__":
    main()
