"""RL iterations in this process, without Ray: the transformers engine rolls out, the rewards score, the
training rank (its ZeRO-3 policy and critic) scores and updates, and the weights go back to the engine.
The driver's own phases are rl/iteration.py's, as rl/driver.py runs them; only the Ray calls are direct
ones here, so this is the RL path of rl/run.py minus Ray's transport (Ray's wheel is too large to carry
to the device).

python benchmarks/gpu/rl_iteration.py OUT_DIR [--iterations N] HYDRA_OVERRIDES...
Runs N iterations (default 2): the first ones warm up (compilation, allocator growth), the last is timed.
Writes OUT_DIR/rl.json: the last iteration's metrics row and phase timings (`time/*`), the warm-up
iterations' timings apart under `warmup`, the setup's under `setup`, and the peak GPU memory.
"""

import argparse
import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from rl.config import RLConfig
from rl.engines.hf import HFEngine
from rl.iteration import advantages, group_responses, minibatches, sampling_params, score_rewards
from rl.prompts import PromptLoader, prompt_loader
from rl.rewards import RewardScorer
from rl.sync import gathered, sync_parameters
from rl.workers.train import TrainWorker
from step3vl_train.processing.processor import Step3VLProcessor, load_processor
from step3vl_train.train.distributed import free_port
from step3vl_train.train.recipes import register_recipes

REPO = Path(__file__).resolve().parents[2]


@dataclass
class Actors:
    """What an iteration calls: the config, the prompts, the engine, the rewards and the training rank."""

    config: RLConfig
    processor: Step3VLProcessor
    loader: PromptLoader
    scorer: RewardScorer
    worker: TrainWorker
    engine: HFEngine

    @property
    def bucket_bytes(self) -> int:
        return self.config.rollout.sync_bucket_mb * 2**20


def sync(worker: TrainWorker, engine: HFEngine, bucket_bytes: int, everything: bool) -> float:
    """As rl/sync.py sends weights, without Ray: every tensor first, the trainable ones after. Returns the
    seconds it took."""
    started = time.perf_counter()
    for name, tensor in gathered(sync_parameters(worker.policy.model, everything), bucket_bytes):
        engine.load_weights({name: tensor})
    engine.finish_weight_update()
    return time.perf_counter() - started


def start(overrides: list[str]) -> tuple[Actors, dict]:
    """The actors, the engine holding the policy's weights; returns them and the setup's timings."""
    register_recipes()
    with initialize_config_dir(str(REPO / "configs"), version_base="1.3"):
        raw = OmegaConf.to_container(compose("rl", overrides), resolve=True)
    config = RLConfig.from_dict(raw)
    processor = load_processor(config.tokenizer, config.processor or None)
    pad = processor.tokenizer.pad_token_id or 0
    loader, scorer = prompt_loader(config, processor), RewardScorer(config.reward)
    tick = time.perf_counter()
    worker = TrainWorker(0, 1, "127.0.0.1", free_port(), raw, pad)
    dtype = torch.bfloat16 if config.trainer.use_bf16 else torch.float32
    engine = HFEngine(config.model, None, pad, config.rollout.batch_size, dtype)
    actors = Actors(config, processor, loader, scorer, worker, engine)
    setup = {"seconds": time.perf_counter() - tick}
    setup["first_sync"] = sync(worker, engine, actors.bucket_bytes, everything=True)
    return actors, setup


def iteration(actors: Actors, step: int) -> dict:
    """RL iteration `step` (from 1): rollout, rewards, scoring, advantages, the update and the weight sync.
    Returns its metrics row with each phase's seconds (`time/*`)."""
    config, worker, timings = actors.config, actors.worker, {}
    sampling = sampling_params(config, actors.processor)
    started = tick = time.perf_counter()
    prompts = actors.loader.next_batch(config.prompts.prompts_per_step, step)
    responses = group_responses(prompts, actors.engine.generate(prompts, sampling, seed=step))
    timings["time/rollout"] = time.perf_counter() - tick
    tick = time.perf_counter()
    score_rewards(actors.scorer, responses, actors.processor.tokenizer.decode, sampling.stop_token_ids)
    timings["time/reward"] = time.perf_counter() - tick
    tick = time.perf_counter()
    stats = worker.score(responses, config.rollout.temperature)
    for index, response in enumerate(responses):
        response.old_logprobs = stats.old_logprobs[index] if stats.old_logprobs is not None else None
        response.values = stats.values[index] if stats.values is not None else None
    timings["time/score"] = time.perf_counter() - tick
    row = advantages(config, responses, stats.entropy_sum)
    shards, counts = minibatches(config, responses, step=step, world=1)
    tick = time.perf_counter()
    sums = worker.update(shards[0], counts)
    timings["time/update"] = time.perf_counter() - tick
    timings["time/sync"] = sync(worker, actors.engine, actors.bucket_bytes, everything=False)
    timings["time/step"] = time.perf_counter() - started
    row |= {"policy_loss": sums["policy_loss"] / len(counts), "value_loss": sums["value_loss"] / len(counts)}
    return {"step": step, **row, **timings}


def phase_timings(row: dict) -> dict:
    """A row's `time/*` entries."""
    return {key: value for key, value in row.items() if key.startswith("time/")}


def report(rows: list[dict], setup: dict) -> dict:
    """The last iteration's row (the timed one), with the earlier ones' timings under `warmup`."""
    result = rows[-1] | {"iterations": len(rows), "timed_iteration": rows[-1]["step"], "setup": setup}
    result["warmup"] = [phase_timings(row) for row in rows[:-1]]
    if torch.cuda.is_available():
        result["memory/peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return result


def main(out: Path, iterations: int, overrides: list[str]) -> None:
    actors, setup = start(overrides)
    try:
        rows = [iteration(actors, step) for step in range(1, iterations + 1)]
    finally:
        actors.scorer.close()
        actors.worker.close()
    result = report(rows, setup)
    (out / "rl.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result))


def parse_arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="where rl.json goes")
    parser.add_argument("--iterations", type=int, default=2, help="the last one timed, the others warm-up")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides of configs/rl.yaml")
    args = parser.parse_intermixed_args()
    if args.iterations < 1:
        parser.error("--iterations must be at least 1")
    return args


if __name__ == "__main__":
    arguments = parse_arguments()
    main(arguments.out, arguments.iterations, arguments.overrides)
