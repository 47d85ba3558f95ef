"""One RL iteration in this process, without Ray: the transformers engine rolls out, the rewards score,
the training rank (its ZeRO-3 policy and critic) scores and updates, and the weights go back to the
engine. The driver's own phases are rl/iteration.py's, as rl/driver.py runs them; only the Ray calls are
direct ones here, so this is the RL path of rl/run.py minus Ray's transport (Ray's wheel is too large
to carry to the device).

python benchmarks/gpu/rl_iteration.py OUT_DIR HYDRA_OVERRIDES...
Writes OUT_DIR/rl.json: the iteration's metrics row, phase timings and peak GPU memory.
"""

import json
import sys
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from rl.config import RLConfig
from rl.engines.hf import HFEngine
from rl.iteration import advantages, group_responses, minibatches, sampling_params, score_rewards
from rl.prompts import prompt_loader
from rl.rewards import RewardScorer
from rl.sync import gathered, sync_parameters
from rl.workers.train import TrainWorker
from step3vl_train.processing.processor import load_processor
from step3vl_train.train.distributed import free_port
from step3vl_train.train.recipes import register_recipes

REPO = Path(__file__).resolve().parents[2]


def sync(worker: TrainWorker, engine: HFEngine, bucket_bytes: int, everything: bool) -> float:
    """As rl/sync.py sends weights, without Ray: every tensor first, the trainable ones after."""
    started = time.perf_counter()
    for name, tensor in gathered(sync_parameters(worker.policy.model, everything), bucket_bytes):
        engine.load_weights({name: tensor})
    engine.finish_weight_update()
    return time.perf_counter() - started


def main(out: Path, overrides: list[str]) -> None:
    register_recipes()
    with initialize_config_dir(str(REPO / "configs"), version_base="1.3"):
        raw = OmegaConf.to_container(compose("rl", overrides), resolve=True)
    config = RLConfig.from_dict(raw)
    processor = load_processor(config.tokenizer, config.processor or None)
    pad = processor.tokenizer.pad_token_id or 0
    loader, scorer = prompt_loader(config, processor), RewardScorer(config.reward)
    sampling, bucket_bytes = sampling_params(config, processor), config.rollout.sync_bucket_mb * 2**20
    timings, tick = {}, time.perf_counter()
    worker = TrainWorker(0, 1, "127.0.0.1", free_port(), raw, pad)
    dtype = torch.bfloat16 if config.trainer.use_bf16 else torch.float32
    engine = HFEngine(config.model, None, pad, config.rollout.batch_size, dtype)
    timings["time/setup"] = time.perf_counter() - tick
    timings["time/first_sync"] = sync(worker, engine, bucket_bytes, everything=True)

    started = tick = time.perf_counter()
    prompts = loader.next_batch(config.prompts.prompts_per_step)
    completions = engine.generate(prompts, sampling, seed=1)
    responses = group_responses(prompts, completions)
    timings["time/rollout"] = time.perf_counter() - tick
    tick = time.perf_counter()
    score_rewards(scorer, responses, processor.tokenizer.decode, sampling.stop_token_ids)
    timings["time/reward"] = time.perf_counter() - tick
    tick = time.perf_counter()
    stats = worker.score(responses, config.rollout.temperature)
    for index, response in enumerate(responses):
        response.old_logprobs = stats.old_logprobs[index] if stats.old_logprobs is not None else None
        response.values = stats.values[index] if stats.values is not None else None
    timings["time/score"] = time.perf_counter() - tick
    row = advantages(config, responses, stats.entropy_sum)
    shards, counts = minibatches(config, responses, step=1, world=1)
    tick = time.perf_counter()
    sums = worker.update(shards[0], counts)
    timings["time/update"] = time.perf_counter() - tick
    timings["time/sync"] = sync(worker, engine, bucket_bytes, everything=False)
    timings["time/step"] = time.perf_counter() - started
    row |= {"policy_loss": sums["policy_loss"] / len(counts), "value_loss": sums["value_loss"] / len(counts)}
    row |= timings
    if torch.cuda.is_available():
        row["memory/peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
    (out / "rl.json").write_text(json.dumps(row, indent=1))
    print(json.dumps(row))
    scorer.close()
    worker.close()


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2:])
