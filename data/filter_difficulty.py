"""Difficulty filtering as the paper did it (spec 5.5): roll out k times per prompt with the current
policy and keep the prompts it solves sometimes but not always (0 < correct < k).

python data/filter_difficulty.py --k 24 [--save-messages] --out DIR -- stage=rlvr tokenizer=... \
    policy.init_from=MODEL [prompts.root=... | prompts.train=PATHS] [rollout=vllm] [rollout.max_new_tokens=...]
python data/filter_difficulty.py --k 8 --out outputs/filtered -- stage=rlvr model=tiny processor=tiny \
    tokenizer=tiny policy.init_from=outputs/demo/sft_hf rollout.max_new_tokens=64     # the CPU

Everything after `--` is a Hydra override of the RL config (configs/rl.yaml): the prompts, the engine, the
sampling and the rewards are the RL stage's own. Each source is read once. Kept samples are written as
shards with a manifest; `difficulty.jsonl` has every prompt's count of correct responses. A response
whose reward could not be computed (timeout, error) counts for neither side. The last line printed is a
JSON summary.

`--save-messages` keeps the rollouts as PaCoRe's message pool (spec 5.7): each of a prompt's k responses
becomes a pool entry (its conclusion, whether it finished, its reward or null where none could be
computed, the reward's status, and the checkpoint that wrote it). Kept samples carry their `pool`, and so
does every prompt's row of `difficulty.jsonl`, kept or not. The kept shards are what
`data/filter_synthesis.py` and `stage=pacore` read. A prompt that already had a pool keeps it, with or
without the flag; this run's entries are added after it.
"""

import json
from pathlib import Path

from rl.filtering import RolloutFilter, filter_parser, load_config, write_prompt
from step3vl_train.data.shards import ShardSetWriter


def main() -> None:
    parser = filter_parser(__doc__.splitlines()[0], 24, "rollouts per prompt")
    parser.add_argument("--save-messages", action="store_true", help="keep the rollouts as each prompt's `pool`")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides of configs/rl.yaml")
    args = parser.parse_args()
    cfg = load_config("filter_difficulty.py", args.overrides)
    rollouts = RolloutFilter(cfg, args.k, args.batch_prompts, args.solved_at)
    out = Path(args.out)
    writer = ShardSetWriter(str(out))
    with (out / "difficulty.jsonl").open("w") as log:
        for group in rollouts.groups():
            prompt, pool = group.prompt, group.pool(rollouts.model) if args.save_messages else None
            row = {"key": prompt.key, "task": prompt.task, "correct": group.correct, "scored": group.scored,
                   "k": args.k, "kept": group.kept}  # fmt: skip
            log.write(json.dumps(row | ({"pool": pool} if pool is not None else {})) + "\n")
            if group.kept:  # a pool the prompt came with is kept, this run's rollouts after it
                write_prompt(writer, prompt, prompt.pool + (pool or []) or None)
    writer.close()
    rollouts.close()
    print(json.dumps(rollouts.summary()))


if __name__ == "__main__":
    main()
