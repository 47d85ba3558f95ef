"""The whole recipe on the tiny model, on the CPU: synthetic corpora -> pre-training (2 ZeRO-3 ranks) ->
export -> SFT -> export -> RLVR on Ray -> a reward-curve PNG and a summary (outputs/demo/summary.md).

    python launch/demo_pipeline.py [--out outputs/demo] [--steps 30] [--rl-steps 12]

Each stage is the command a user runs (launch/pretrain.py, launch/sft.py, launch/export_hf.py, rl/run.py),
in a subprocess. Re-running resumes each stage from its last checkpoint. In minutes on a CPU the 0.7M-
parameter model learns neither the answer format nor the tasks, so the RLVR reward stays near 0: the demo
shows every stage running and handing its model to the next. tests/rl/test_rl_run.py shows the reward
rising on a task a tiny model can learn.
"""

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from rl.plot import plot_rewards
from step3vl_train.data.synthetic import write_corpus

REPO = Path(__file__).resolve().parents[1]
TINY = ["model=tiny", "processor=tiny", "tokenizer=tiny", "logging.mode=offline"]
# Short packed sequences, one micro-batch a step and a flat learning rate: what the CPU can do in minutes.
TRAIN = [
    "data.packing.seq_len=1024", "data.packing.window=4", "data.num_workers=1", "optim.lr=1e-3",
    "optim.schedule.shape=constant", "optim.schedule.warmup_tokens=0", "trainer.grad_accum=1",
]  # fmt: skip


def run(stage: str, command: list[str], log_dir: Path) -> float:
    started = time.monotonic()
    print(f"== {stage}: {' '.join(command)}", flush=True)
    with (log_dir / f"{stage}.log").open("w") as log:
        done = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, cwd=REPO,
                              env={**os.environ, "OMP_NUM_THREADS": "1"})  # fmt: skip
    if done.returncode != 0:
        sys.exit(f"{stage} failed (exit {done.returncode}): see {log_dir / f'{stage}.log'}")
    return time.monotonic() - started


def train(
    stage: str, script: str, recipe: str, corpus: Path, out: Path, steps: int, init_from: Path | None, *extra: str
) -> list:
    return [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", str(REPO / "launch" / script),
        f"+recipe={recipe}", *TINY, *TRAIN, f"data.root={corpus}", f"trainer.max_steps={steps}",
        f"trainer.save_every={steps}", f"trainer.output_dir={out / stage}",
        *([f"trainer.init_from={init_from}"] if init_from else []), *extra,
    ]  # fmt: skip


def export(stage: str, out: Path) -> list:
    return [
        sys.executable,
        str(REPO / "launch" / "export_hf.py"),
        f"checkpoint={out / stage}",
        f"out={out / f'{stage}_hf'}",
    ]


def metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="outputs/demo")
    parser.add_argument("--steps", type=int, default=30, help="pre-training and SFT steps")
    parser.add_argument("--rl-steps", type=int, default=12)
    args = parser.parse_args()
    out = (REPO / args.out).resolve()
    logs = out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    corpora = {kind: out / "synthetic" / kind for kind in ("pretrain", "sft", "rl")}
    for kind, num in (("pretrain", 400), ("sft", 300), ("rl", 200)):
        if not (corpora[kind] / "text").exists() and not (corpora[kind] / "math").exists():
            write_corpus(kind, str(corpora[kind]), num=num, seed=0, shard_size=10)

    seconds = {}
    seconds["pretrain"] = run("pretrain", train("pretrain", "pretrain.py", "phase1", corpora["pretrain"], out,
                                                args.steps, None), logs)  # fmt: skip
    seconds["export pretrain"] = run("export_pretrain", export("pretrain", out), logs)
    # As the 128K recipe does on a node, at CPU scale: both ranks share each packed row (Ulysses).
    seconds["sft"] = run("sft", train("sft", "sft.py", "sft_stage1", corpora["sft"], out, args.steps,
                                      out / "pretrain_hf", "trainer.sequence_parallel=2"), logs)  # fmt: skip
    seconds["export sft"] = run("export_sft", export("sft", out), logs)
    rl = [
        sys.executable, str(REPO / "rl" / "run.py"), "stage=rlvr", *TINY, f"prompts.root={corpora['rl']}",
        f"policy.init_from={out / 'sft_hf'}", "prompts.prompts_per_step=8", "rollout.n=4", "algo.minibatches=2",
        "policy.micro_batch_tokens=4096", "critic.micro_batch_tokens=4096", "rollout.max_new_tokens=48",
        "policy.optim.lr=1e-4", "critic.optim.lr=1e-4", f"run.max_steps={args.rl_steps}",
        f"run.save_every={args.rl_steps}", f"run.output_dir={out / 'rlvr'}",
    ]  # fmt: skip
    seconds["rlvr"] = run("rlvr", rl, logs)
    png = plot_rewards(out / "rlvr")

    pretrain, sft, rlvr = (metrics(out / stage / "metrics.jsonl") for stage in ("pretrain", "sft", "rlvr"))

    def row(name: str, rows: list[dict], key: str, stage: str) -> str:
        return f"| {name} ({key}) | {len(rows)} | {rows[0][key]:.3f} | {rows[-1][key]:.3f} | {seconds[stage]:.0f} |"

    lines = [
        "# The tiny pipeline on the CPU", "",
        "| stage | steps | first | last | seconds |", "|---|---|---|---|---|",
        row("pre-training", pretrain, "loss", "pretrain"), row("SFT", sft, "loss", "sft"),
        row("RLVR", rlvr, "reward_mean", "rlvr"),
        "", f"Reward curve: `{png.relative_to(out)}`. Exports: `pretrain_hf/`, `sft_hf/`. Logs: `logs/`.",
        f"RL log-prob mismatch, engine vs trainer (max over the run): "
        f"{max(row['logprob_mismatch/max_abs'] for row in rlvr):.2e}.",
    ]  # fmt: skip
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
