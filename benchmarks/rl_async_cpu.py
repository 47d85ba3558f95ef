"""RL that never waits, by simulation: the real driver (rl/driver.py, rl/producer.py, Ray, the reward
scorer, the prompt loader on the synthetic RL corpus) with scripted actors that take a set time per token, so
that 2 CPU cores do not distort it.

python benchmarks/rl_async_cpu.py [overlap|tail|all] [--steps 12]

- A scripted engine decodes like vLLM: continuous batching over `SLOTS` rows, every active row one token a
  step of STEP_S seconds. Its responses have lengths drawn per (prompt, sample), the same in every run.
- A scripted trainer scores and updates in TRAIN_S seconds a response token; its weight sync takes SYNC_S.
- overlap: every response LENGTH tokens, generation G and training T about equal. Iteration time with
  algo.max_staleness 0 and 1, beside max(G, T) x 1.1 + sync (the goal for k = 1).
- tail: lognormal lengths, p99/median >= 8. The engines' busy share (time inside a generation call over the
  run) and their slot use (active rows over SLOTS, inside calls), synchronous against k = 1 with and
  without rollout.partial.

Iterations after the first 2 (warm-up) count; each run is a fresh Ray instance.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from types import SimpleNamespace

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import ray  # noqa: E402
import torch  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

from rl.config import RLConfig  # noqa: E402
from rl.driver import Driver  # noqa: E402
from rl.experience import Completion  # noqa: E402
from rl.iteration import LOGPROB_SUMS  # noqa: E402
from step3vl_train.data.synthetic.tasks import write_corpus  # noqa: E402
from step3vl_train.train.recipes import register_recipes  # noqa: E402

SLOTS = 64  # rows an engine decodes at once
STEP_S = 0.01  # one decoding step: an iteration of 1-3 s, 20-60x the sync, as at the paper's scale
SYNC_S = 0.05
PROMPTS, N = 8, 4  # a batch: 8 prompts x 4 responses, 32 rows: one engine's slots hold a batch and its extra
LENGTH = 100  # overlap: every response
MEDIAN, SIGMA = 40, 0.9  # tail: lognormal, p99/median = exp(2.326 x 0.9) = 8.1
MAX_NEW = 800
WARMUP = 2


def response_length(key: str, sample: int, tail: bool) -> int:
    if not tail:
        return LENGTH
    draw = random.Random(f"{key}/{sample}").lognormvariate(math.log(MEDIAN), SIGMA)
    return max(1, min(MAX_NEW, round(draw)))


class ScriptedEngine:
    """RolloutWorker's interface, decoding by the clock. Writes each call's span and slot use to `log`."""

    def __init__(self, log: str, tail: bool, token: int, stop: int):
        self.log, self.tail, self.token, self.stop = log, tail, token, stop
        self.paused = threading.Event()

    def pid(self) -> int:
        return os.getpid()

    def generate(self, prompts, sampling, seed):
        rows = [(p, None, j) for p in prompts for j in range(sampling.n)]
        out = self._decode(rows, sampling.max_new_tokens, None, 0)
        return [out[i : i + sampling.n] for i in range(0, len(out), sampling.n)], 0.0

    def generate_rows(self, rows, sampling, seed, groups, enough):
        samples, seen = [], {}
        for prompt, prefix in rows:  # a new row is its prompt's j-th here; a paused one's first token says j
            j = prefix.token_ids[0] - self.token - 1 if prefix else seen.setdefault(prompt.key, 0)
            seen[prompt.key] = seen.get(prompt.key, 0) + (prefix is None)
            samples.append((prompt, prefix, j))
        return self._decode(samples, sampling.max_new_tokens, groups, enough), 0.0

    def _decode(self, rows, max_new, groups, enough):
        start = time.perf_counter()
        done = [len(prefix.token_ids) if prefix else 0 for _, prefix, _ in rows]
        target = [min(response_length(p.key, j, self.tail), max_new) for p, _, j in rows]
        finished = [d >= t for d, t in zip(done, target, strict=True)]
        steps = used = 0
        while not all(finished) and not self.paused.is_set():
            if groups and enough and self._whole(groups, finished) >= enough:
                break
            active = [i for i, f in enumerate(finished) if not f][:SLOTS]
            time.sleep(STEP_S)
            steps, used = steps + 1, used + len(active)
            for i in active:
                done[i] += 1
                finished[i] = done[i] >= target[i]
        with open(self.log, "a") as handle:
            handle.write(json.dumps({"start": start, "end": time.perf_counter(), "steps": steps, "used": used}) + "\n")
        out = []
        for (_, _, j), count, goal, over in zip(rows, done, target, finished, strict=True):
            ids = [self.token + 1 + j] + [self.token] * (count - 1) if count else []
            if over and goal < max_new:
                ids[-1] = self.stop
            reason = ("stop" if goal < max_new else "length") if over else "paused"
            out.append(Completion(ids, [0.0] * count, reason))
        return out

    @staticmethod
    def _whole(groups, finished) -> int:
        open_groups = {g for g, f in zip(groups, finished, strict=True) if not f}
        return len(set(groups) - open_groups)

    def pause_generation(self):
        self.paused.set()

    def resume_generation(self):
        self.paused.clear()

    def sync_failure(self):
        return None

    def sleep(self):
        pass

    def wake_up(self, tags=None):
        pass


class ScriptedTrainer:
    """TrainWorker's interface: scoring and the update take TRAIN_S a response token, the sync SYNC_S."""

    def __init__(self, train_s: float):
        self.train_s = train_s

    def pid(self) -> int:
        return os.getpid()

    def score(self, responses, temperature):
        time.sleep(self.train_s * sum(r.length for r in responses) / 3)
        return SimpleNamespace(old_logprobs=[torch.tensor(r.completion.logprobs) for r in responses], values=None,
                               entropy_sum=0.0, image_cache={})  # fmt: skip

    def update(self, responses, counts):
        time.sleep(self.train_s * sum(r.length for r in responses) * 2 / 3)
        sums = {"policy_loss": 0.0, "value_loss": 0.0, "clip_tokens": 0.0, "approx_kl": 0.0, "policy_grad_norm": 0.0}
        return sums | dict.fromkeys(LOGPROB_SUMS, 0.0)

    def sync_weights(self, engines, everything):
        time.sleep(SYNC_S)
        return {}

    def save(self, path):
        pass

    def load(self, path):
        pass

    def close(self):
        pass


class ScriptedDriver(Driver):
    """The real driver's loop over scripted actors."""

    def __init__(self, config, raw, tail: bool, train_s: float):
        super().__init__(config, raw)
        self.tail, self.train_s = tail, train_s

    def start_actors(self) -> None:
        vocab = self.processor.tokenizer.get_vocab()
        self.group = ray.util.placement_group([{"CPU": 1}] * self.cfg.trainer.world_size)
        ray.get(self.group.ready())
        trainer = ray.remote(ScriptedTrainer).options(num_cpus=0)
        self.workers = [trainer.remote(self.train_s) for _ in range(self.cfg.trainer.world_size)]
        engine = ray.remote(ScriptedEngine).options(num_cpus=0, max_concurrency=2)
        log = str(self.run_dir / "engines.jsonl")
        self.engines = [engine.remote(log, self.tail, vocab["a"], vocab["<|im_end|>"])]
        self.engine_pids = ray.get([e.pid.remote() for e in self.engines])


def run(work: Path, corpus: Path, name: str, steps: int, tail: bool, train_s: float, *overrides: str) -> dict:
    out = work / name
    settings = [
        "stage=rlvr", "model=tiny", "processor=tiny", "tokenizer=tiny", "logging.mode=disabled",
        f"prompts.root={corpus}", f"trainer.output_dir={out}", f"trainer.max_steps={steps}",
        "trainer.save_every=1000", f"prompts.prompts_per_step={PROMPTS}", f"rollout.n={N}", "algo.minibatches=1",
        "algo.estimator=grpo", "critic.enabled=false", f"rollout.max_new_tokens={MAX_NEW}", "reward.num_workers=1",
        "reward.require_reasoning=false", "policy.from_scratch=true", *overrides,
    ]  # fmt: skip
    with initialize_config_dir(str(REPO / "configs"), version_base="1.3"):
        raw = OmegaConf.to_container(compose("rl", settings), resolve=True)
    config = RLConfig.from_dict(raw)
    ray.init(address="local", num_cpus=8, include_dashboard=False, logging_level="ERROR")
    try:
        ScriptedDriver(config, raw, tail, train_s).run()
    finally:
        ray.shutdown()
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()][WARMUP:]
    calls = [json.loads(line) for line in (out / "engines.jsonl").read_text().splitlines()]
    first, last = calls[0]["start"], calls[-1]["end"]
    busy = sum(c["end"] - c["start"] for c in calls)
    steps_ = sum(c["steps"] for c in calls)
    return {
        "iteration_s": statistics.median(r["time/step"] for r in rows),
        "rollout_s": statistics.median(r["time/rollout"] for r in rows),
        "wait_s": statistics.median(r["time/wait_rollouts"] for r in rows),
        "train_s": statistics.median(r["time/score"] + r["time/update"] for r in rows),
        "sync_s": statistics.median(r["time/sync"] for r in rows),
        "busy": busy / (last - first),
        "slot_use": sum(c["used"] for c in calls) / max(steps_ * SLOTS, 1),
        "staleness_mean": statistics.mean(r.get("staleness/mean", 0.0) for r in rows),
        "left_out": statistics.mean(r.get("staleness/left_out", 0.0) for r in rows),
    }


def overlap(work: Path, corpus: Path, steps: int) -> dict:
    train_s = 2 * STEP_S / (PROMPTS * N)  # a rank's half of the tokens: T about G
    sync = run(work, corpus, "overlap_k0", steps, False, train_s)
    ahead = run(work, corpus, "overlap_k1", steps, False, train_s, "algo.max_staleness=1")
    # G: what the synchronous loop waits for a batch (prompts, generation, rewards); T: the rest but the sync
    g, s = sync["wait_s"], sync["sync_s"]
    t = sync["iteration_s"] - g - s
    goal = max(g, t) * 1.1 + s
    print(
        f"\n### Overlap: {PROMPTS} x {N} responses of {LENGTH} tokens; G = {g:.3f} s, T = {t:.3f} s, sync {s:.3f} s\n"
    )
    print("| algo.max_staleness | iteration (median) | goal |\n|---|---|---|")
    print(f"| 0 | {sync['iteration_s']:.3f} s | (G + T + sync) |")
    print(f"| 1 | {ahead['iteration_s']:.3f} s | <= max(G, T) x 1.1 + sync = {goal:.3f} s |")
    return {"k0": sync, "k1": ahead, "goal_s": goal}


def tail(work: Path, corpus: Path, steps: int) -> dict:
    train_s = STEP_S * MEDIAN / (PROMPTS * N * MEDIAN)
    runs = {
        "synchronous (k = 0)": run(work, corpus, "tail_k0", steps, True, train_s),
        "k = 1": run(work, corpus, "tail_k1", steps, True, train_s, "algo.max_staleness=1"),
        "k = 1, partial": run(
            work, corpus, "tail_k1_partial", steps, True, train_s, "algo.max_staleness=1", "rollout.partial=true"
        ),  # fmt: skip
        "k = 2, partial": run(
            work, corpus, "tail_k2_partial", steps, True, train_s, "algo.max_staleness=2", "rollout.partial=true"
        ),  # fmt: skip
    }
    print(f"\n### Long tail: lognormal lengths, median {MEDIAN}, sigma {SIGMA} (p99/median 8.1), at most {MAX_NEW}\n")
    print("| run | iteration (median) | engines busy | slot use | staleness (mean) | tokens left out |")
    print("|---|---|---|---|---|---|")
    for name, r in runs.items():
        print(f"| {name} | {r['iteration_s']:.3f} s | {r['busy']:.1%} | {r['slot_use']:.1%} | "
              f"{r['staleness_mean']:.2f} | {r['left_out']:.1%} |")  # fmt: skip
    return runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", nargs="?", default="all", choices=["overlap", "tail", "all"])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--json", help="write the figures here")
    args = parser.parse_args()
    register_recipes()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        corpus = work / "rl"
        write_corpus("rl", str(corpus), num=400, seed=0, shard_size=50)
        if args.mode in ("overlap", "all"):
            results["overlap"] = overlap(work, corpus, args.steps)
        if args.mode in ("tail", "all"):
            results["tail"] = tail(work, corpus, args.steps)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
