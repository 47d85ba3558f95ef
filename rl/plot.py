"""A run's curves as a PNG, from its metrics.jsonl: an RL run's reward (`reward_curve.png`), a
pre-training, SFT or reward-model run's loss (`loss_curve.png`).

    python rl/plot.py RUN_DIR [--out FILE]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

# Per-task lines in styles of their own, so that one lying on another (or on the mean) stays visible.
STYLES = [("-", "o"), ("--", "s"), (":", "^"), ("-.", "D"), ("-", "v"), ("--", "x")]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    return pyplot


def _rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _series(rows: list[dict], key: str) -> list[tuple[int, float]]:
    """(step, value) of each row where `key` holds a number."""
    return [(row["step"], row[key]) for row in rows if row.get(key) is not None]


def _by_part(axis, rows: list[dict], prefix: str) -> list[str]:
    """One line for each `prefix<part>` metric, in a style of its own; the parts found."""
    parts = sorted({key.removeprefix(prefix) for row in rows for key in row if key.startswith(prefix)})
    for index, part in enumerate(parts):
        line, marker = STYLES[index % len(STYLES)]
        axis.plot(*zip(*_series(rows, prefix + part), strict=True), linestyle=line, marker=marker, markersize=3,
                  linewidth=1.2, label=part)  # fmt: skip
    return parts


def _save(pyplot, figure, axes, y_label: str, out: Path) -> Path:
    for axis in axes:
        axis.set_ylabel(y_label)
        axis.grid(alpha=0.3)
        if axis.get_legend_handles_labels()[0]:
            axis.legend(fontsize=8, loc="best")
    figure.tight_layout()
    figure.savefig(out)
    pyplot.close(figure)
    return out


def plot_rewards(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Mean reward (top, with the held-out prompts' `eval/reward` where the run validates) and each task's
    and reward component's (bottom: `reward/*`, e.g. RLHF's reward model score `rm` and its penalties)
    against the iteration, from `RUN_DIR/metrics.jsonl`. A reward is the mean score of an iteration's
    responses, 0-1."""
    pyplot, run_dir = _pyplot(), Path(run_dir)
    rows = _rows(run_dir)
    figure, (top, bottom) = pyplot.subplots(2, 1, figsize=(7, 6), dpi=120, sharex=True)
    top.plot(*zip(*_series(rows, "reward_mean"), strict=True), color="black", linewidth=2, marker="o", label="mean")
    if held_out := _series(rows, "eval/reward"):  # step 0: the validation before training, alone in its row
        top.plot(*zip(*held_out, strict=True), color="tab:red", linestyle="--", marker="s", label="held-out (eval)")
    top.set_title(f"{run_dir.name}: mean reward of each iteration's responses (0-1)")
    tasks = _by_part(bottom, rows, "reward/")
    bottom.set_title("by task and component" if tasks else "by task (none logged)")
    bottom.set_xlabel("iteration")
    for axis in (top, bottom):
        axis.set_ylim(-0.02, 1.02)
    return _save(pyplot, figure, (top, bottom), "reward", Path(out) if out else run_dir / "reward_curve.png")


def plot_losses(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Training loss (top, each logged step) and validation loss (`eval/loss`, where the run validates),
    with a dotted line where a phase of a run of phases takes over; below, the validation loss of each
    source (`eval/loss/<source>`). In nats per trained token (a reward model's: its Bradley-Terry loss)."""
    pyplot, run_dir = _pyplot(), Path(run_dir)
    rows = _rows(run_dir)
    figure, (top, bottom) = pyplot.subplots(2, 1, figsize=(7, 6), dpi=120, sharex=True)
    top.plot(*zip(*_series(rows, "loss"), strict=True), color="black", linewidth=1.5, label="training")
    if validation := _series(rows, "eval/loss"):
        top.plot(*zip(*validation, strict=True), color="tab:red", linestyle="--", marker="s", label="validation")
    phases = [(row["step"], row["phase"]) for row in rows if "phase" in row]
    for (_, before), (step, phase) in zip(phases, phases[1:], strict=False):
        if phase != before:  # the first step of the new phase
            top.axvline(step, color="gray", linestyle=":", label=f"phase {phase + 1}")
    top.set_title(f"{run_dir.name}: loss")
    sources = _by_part(bottom, rows, "eval/loss/")
    bottom.set_title("validation loss by source" if sources else "validation loss by source (none logged)")
    bottom.set_xlabel("step")
    return _save(pyplot, figure, (top, bottom), "loss", Path(out) if out else run_dir / "loss_curve.png")


def plot_run(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """The loss curve of a run that logs `loss` (pre-training, SFT, a reward model), else the reward curve."""
    rows = _rows(Path(run_dir))
    return (plot_losses if any("loss" in row for row in rows) else plot_rewards)(run_dir, out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir")
    parser.add_argument("--out")
    args = parser.parse_args()
    print(plot_run(args.run_dir, args.out))


if __name__ == "__main__":
    main()
