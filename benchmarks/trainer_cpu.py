"""How long a pre-training step waits for its data, on the CPU: the real trainer (one rank, ZeRO-3 on gloo,
`launch/pretrain.py`'s Trainer with `+recipe=pretrain +cpu=pretrain`) at trainer.grad_accum=16, once with
packs slower to make than a micro-step is to compute, once with packs faster, and once more with packs
faster through the loop before issue 27, which collected a step's micro-batches before its first forward.

python benchmarks/trainer_cpu.py [--grad-accum 16] [--steps 4] [--workers 2] [--compute-s 0.25] \
    [--pack-s 0.4] [--slow-pack-s 1.0]

On this CPU the tiny model takes about 0.26 s a micro-step (1,024-token packs, ZeRO-3's hooks, one
thread) and a worker makes a pack in about 0.03 s, so the two sides are set by sleeps in the benchmark
alone: `--compute-s` in a forward pre-hook on the model (a stand-in for a GPU busy with a large model,
which leaves the CPU to the workers as a GPU would), `--pack-s` (or `--slow-pack-s`) in each worker's
collate, a pack at a time. "packs slower": no compute sleep, packs of 1.0 s from 2 workers (0.5 s a pack
against 0.26). "packs faster": 0.25 s of compute sleep (0.51 s a micro-step), packs of 0.4 s from 2
workers (0.2 s a pack). For each run it prints, over the steps after the first (the workers' start-up),
the medians of the step's seconds, `time/data_wait` and its share of the step.
"""

import argparse
import itertools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir

from step3vl_train.data.synthetic import write_corpus
from step3vl_train.train.distributed import free_port
from step3vl_train.train.recipes import register_recipes
from step3vl_train.train.trainer import Trainer

REPO = Path(__file__).resolve().parents[1]


def trainer(data: Path, out: Path, args) -> Trainer:
    register_recipes()
    overrides = [
        "+recipe=pretrain", "+cpu=pretrain", f"data.root={data}", "data.eval=[]", f"data.num_workers={args.workers}",
        f"trainer.grad_accum={args.grad_accum}", f"trainer.max_steps={args.steps}", "trainer.save_every=0",
        "trainer.eval_every=0", f"trainer.output_dir={out}", "logging.mode=disabled",
    ]  # fmt: skip
    with initialize_config_dir(str(REPO / "configs"), version_base="1.3"):
        return Trainer(compose("pretrain", overrides))


def run(data: Path, compute_s: float, pack_s: float, collected: bool, args) -> dict:
    """One run of `args.steps` steps; the medians over all but the first. `collected`: the loop before
    issue 27, a step's micro-batches all made before its first forward (its wait measured here)."""
    out = Path(tempfile.mkdtemp())
    loop = trainer(data, out, args)
    collate = loop.loader.loader.collate_fn

    def slow_collate(packs):
        time.sleep(pack_s)
        return collate(packs)

    loop.loader.loader.collate_fn = slow_collate  # the workers take it when the loop starts them
    loop.ds.model.register_forward_pre_hook(lambda *_: time.sleep(compute_s))
    waits = []
    if collected:
        streamed = loop.train_step

        def collect_first(batches):
            started = time.perf_counter()
            micro = list(itertools.islice(batches, args.grad_accum))
            waits.append(time.perf_counter() - started)
            return streamed(iter(micro))

        loop.train_step = collect_first
    try:
        loop.run()
    finally:
        loop.close()
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    step = [row["time/step"] + (waits[i] if collected else 0.0) for i, row in enumerate(rows)][1:]
    wait = [row["time/data_wait"] + (waits[i] if collected else 0.0) for i, row in enumerate(rows)][1:]
    median_step, median_wait = statistics.median(step), statistics.median(wait)
    return {
        "compute_sleep_s": compute_s,
        "pack_sleep_s": pack_s,
        "step_s": round(median_step, 3),
        "data_wait_s": round(median_wait, 3),
        "data_wait_share": round(median_wait / median_step, 4),
    }


RUNS = {  # name: (compute sleep, pack sleep, collected first), from the arguments
    "packs_slower": lambda args: (0.0, args.slow_pack_s, False),
    "packs_faster": lambda args: (args.compute_s, args.pack_s, False),
    "packs_faster_collected_first": lambda args: (args.compute_s, args.pack_s, True),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--grad-accum", type=int, default=16)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--compute-s", type=float, default=0.25, help="sleep a forward, 'packs faster'")
    parser.add_argument("--pack-s", type=float, default=0.4, help="sleep a pack, 'packs faster'")
    parser.add_argument("--slow-pack-s", type=float, default=1.0, help="sleep a pack, 'packs slower'")
    parser.add_argument("--one", choices=RUNS, help=argparse.SUPPRESS)  # a run in this process, on --data
    parser.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one is not None:
        torch.set_num_threads(1)
        os.environ.update({"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1"})
        os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())})
        print(json.dumps(run(args.data, *RUNS[args.one](args), args)))
        return
    data = Path(tempfile.mkdtemp())
    write_corpus("pretrain", str(data), num=400, seed=0, shard_size=50)
    results = {"grad_accum": args.grad_accum, "workers": args.workers, "steps": args.steps}
    for name in RUNS:
        # A process a run: DeepSpeed keeps its process groups for the life of the process.
        command = [sys.executable, __file__, "--one", name, "--data", str(data), "--grad-accum", str(args.grad_accum)]
        command += ["--steps", str(args.steps), "--workers", str(args.workers), "--compute-s", str(args.compute_s)]
        command += ["--pack-s", str(args.pack_s), "--slow-pack-s", str(args.slow_pack_s)]
        done = subprocess.run(command, capture_output=True, text=True, check=True, cwd=REPO)
        results[name] = json.loads(done.stdout.strip().splitlines()[-1])
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
