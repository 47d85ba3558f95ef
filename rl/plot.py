"""The reward curve of an RL run as a PNG: python rl/plot.py RUN_DIR [--out FILE]."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

# Per-task lines in styles of their own, so that one lying on another (or on the mean) stays visible.
STYLES = [("-", "o"), ("--", "s"), (":", "^"), ("-.", "D"), ("-", "v"), ("--", "x")]


def plot_rewards(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Mean reward (top, with the held-out prompts' `eval/reward` where the run validates) and each task's
    and reward component's (bottom: `reward/*`, e.g. RLHF's reward model score `rm` and its penalties)
    against the iteration, from `RUN_DIR/metrics.jsonl`. A reward is the mean score of an iteration's
    responses, 0-1."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    run_dir = Path(run_dir)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    tasks = sorted({key for row in rows for key in row if key.startswith("reward/")})
    figure, (top, bottom) = plt.subplots(2, 1, figsize=(7, 6), dpi=120, sharex=True)
    trained = [(row["step"], row["reward_mean"]) for row in rows if "reward_mean" in row]  # step 0: validation only
    top.plot(*zip(*trained, strict=True), color="black", linewidth=2, marker="o", label="mean")
    held_out = [(row["step"], row["eval/reward"]) for row in rows if row.get("eval/reward") is not None]
    if held_out:
        top.plot(*zip(*held_out, strict=True), color="tab:red", linestyle="--", marker="s", label="held-out (eval)")
    top.set_title(f"{run_dir.name}: mean reward of each iteration's responses (0-1)")
    for index, task in enumerate(tasks):
        points = [(row["step"], row[task]) for row in rows if task in row]
        line, marker = STYLES[index % len(STYLES)]
        bottom.plot(*zip(*points, strict=True), linestyle=line, marker=marker, markersize=3, linewidth=1.2,
                    label=task.removeprefix("reward/"))  # fmt: skip
    bottom.set_title("by task and component" if tasks else "by task (none logged)")
    bottom.set_xlabel("iteration")
    for axis in (top, bottom):
        axis.set_ylabel("reward")
        axis.set_ylim(-0.02, 1.02)
        axis.grid(alpha=0.3)
        if axis.get_legend_handles_labels()[0]:
            axis.legend(fontsize=8, loc="upper left")
    out = Path(out) if out else run_dir / "reward_curve.png"
    figure.tight_layout()
    figure.savefig(out)
    plt.close(figure)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir")
    parser.add_argument("--out")
    args = parser.parse_args()
    print(plot_rewards(args.run_dir, args.out))


if __name__ == "__main__":
    main()
