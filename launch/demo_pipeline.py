"""The whole recipe on the tiny model, on the CPU: synthetic corpora -> pre-training (2 ZeRO-3 ranks) ->
export -> SFT stage 1 -> export -> SFT stage 2 -> export -> RLVR on Ray -> a reward-curve PNG and a
summary (outputs/demo/summary.md).

    python launch/demo_pipeline.py [--out outputs/demo] [--steps N] [--rl-steps N]

Each stage is the command a user runs (printed, and documented in docs/training.md and docs/rl.md), in a
subprocess, from the current directory (outputs go under it); the `+cpu=...` groups (configs/cpu/) hold
the CPU settings, so the commands stay short.
`--steps` and `--rl-steps` override the groups' step counts (tests use them to run a few). Re-running
resumes each stage from its last checkpoint. SFT teaches the tiny model the answer format; RLVR then
trains on the one synthetic task it can learn in minutes (configs/cpu/rlvr.yaml), so the reward rises.
"""

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from rl.plot import plot_rewards

REPO = Path(__file__).resolve().parents[1]
# How the documented commands' first words run here: this interpreter, so the venv's packages.
EXECUTABLES = {"python": [sys.executable], "torchrun": [sys.executable, "-m", "torch.distributed.run"]}
# What the summary's figures mean (its table's last column).
MEANINGS = {
    "loss": "mean cross-entropy per trained token, in nats (a uniform guess over the 1,024-token vocabulary: 6.93)",
    "reward_mean": "the share of responses the verifier scored correct, 0-1 (`choice`: the option letter; "
    "a uniform guess among 4 options scores 0.25, a response cut at the length limit or without "
    "`</think>` scores 0)",
}


def run(stage: str, command: str, log_dir: Path) -> float:
    started = time.monotonic()
    print(f"== {stage}: {command}", flush=True)
    program, *arguments = command.split()
    arguments = [str(REPO / a) if a.endswith(".py") else a for a in arguments]  # the scripts, from anywhere
    with (log_dir / f"{stage}.log").open("w") as log:
        done = subprocess.run([*EXECUTABLES[program], *arguments], stdout=log, stderr=subprocess.STDOUT,
                              env={**os.environ, "OMP_NUM_THREADS": "1"})  # fmt: skip
    if done.returncode != 0:
        sys.exit(f"{stage} failed (exit {done.returncode}): see {log_dir / f'{stage}.log'}")
    return time.monotonic() - started


def steps(count: int | None) -> str:
    return f" trainer.max_steps={count} trainer.save_every={count}" if count else ""


def commands(out: Path, train_steps: int | None, rl_steps: int | None) -> dict[str, str]:
    """The stages' commands, in order; paths relative to the current directory unless `out` is absolute."""
    corpus = out / "synthetic"
    train = "torchrun --nproc_per_node 2 launch"
    synthetic = "python data/make_synthetic.py --shard-size 10"
    return {
        "synthetic_pretrain": f"{synthetic} --kind pretrain --out {corpus / 'pretrain'} --num 400",
        "synthetic_sft": f"{synthetic} --kind sft --out {corpus / 'sft'} --num 420",
        "synthetic_rl": f"{synthetic} --kind rl --out {corpus / 'rl'} --num 240",
        "pretrain": f"{train}/pretrain.py +recipe=phase1 +cpu=pretrain data.root={corpus / 'pretrain'} "
        f"trainer.output_dir={out / 'pretrain'}" + steps(train_steps),
        "export_pretrain": f"python launch/export_hf.py checkpoint={out / 'pretrain'} out={out / 'pretrain_hf'}",
        "sft": f"{train}/sft.py +recipe=sft_stage1 +cpu=sft data.root={corpus / 'sft'} "
        f"trainer.init_from={out / 'pretrain_hf'} trainer.output_dir={out / 'sft'}" + steps(train_steps),
        "export_sft": f"python launch/export_hf.py checkpoint={out / 'sft'} out={out / 'sft_hf'}",
        "sft2": f"{train}/sft.py +recipe=sft_stage2 +cpu=sft data.root={corpus / 'sft'} "
        f"trainer.init_from={out / 'sft_hf'} trainer.output_dir={out / 'sft2'}" + steps(train_steps),
        "export_sft2": f"python launch/export_hf.py checkpoint={out / 'sft2'} out={out / 'sft2_hf'}",
        "rlvr": f"python rl/run.py stage=rlvr +cpu=rlvr policy.init_from={out / 'sft2_hf'} "
        f"prompts.root={corpus / 'rl'} trainer.output_dir={out / 'rlvr'}" + steps(rl_steps),
    }


def metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def mean(values: list[float]) -> float:
    return sum(values) / len(values)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="outputs/demo", help="relative to the current directory, or absolute")
    parser.add_argument("--steps", type=int, help="pre-training and SFT steps (default: configs/cpu/)")
    parser.add_argument("--rl-steps", type=int, help="RLVR iterations (default: configs/cpu/rlvr.yaml)")
    args = parser.parse_args()
    root = Path(args.out)
    logs = root / "logs"
    logs.mkdir(parents=True, exist_ok=True)

    seconds = {stage: run(stage, command, logs) for stage, command in commands(Path(args.out), args.steps,
                                                                              args.rl_steps).items()}  # fmt: skip
    png = plot_rewards(root / "rlvr")
    pretrain, sft, sft2, rlvr = (
        metrics(root / stage / "metrics.jsonl") for stage in ("pretrain", "sft", "sft2", "rlvr")
    )

    def row(name: str, rows: list[dict], key: str, stage: str, window: int = 1) -> str:
        first, last = mean([r[key] for r in rows[:window]]), mean([r[key] for r in rows[-window:]])
        return f"| {name} | {len(rows)} | {first:.3f} | {last:.3f} | {seconds[stage]:.0f} | {key} |"

    window = min(3, len(rlvr))
    lines = [
        "# The tiny pipeline on the CPU", "",
        "| stage | steps | first | last | seconds | figure |", "|---|---|---|---|---|---|",
        row("pre-training (loss)", pretrain, "loss", "pretrain"), row("SFT stage 1 (loss)", sft, "loss", "sft"),
        row("SFT stage 2 (loss)", sft2, "loss", "sft2"),
        row("RLVR (reward_mean)", rlvr, "reward_mean", "rlvr", window), "",
        f"Pre-training and SFT: the first and the last step's figure. RLVR: the mean of the first {window} "
        f"and of the last {window} iterations.", "",
        *(f"- `{key}`: {meaning}." for key, meaning in MEANINGS.items()), "",
        f"Reward curve: `{png.relative_to(root)}`. Exports: `pretrain_hf/`, `sft_hf/`, `sft2_hf/`. Logs: `logs/`. "
        f"Exports take {sum(v for k, v in seconds.items() if k.startswith('export')):.0f} s in all.",
        f"RL log-prob mismatch, engine vs trainer (max over the run): "
        f"{max(r['logprob_mismatch/max_abs'] for r in rlvr):.2e}.",
    ]  # fmt: skip
    (root / "summary.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
