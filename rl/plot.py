"""The reward curve of an RL run as a PNG: python rl/plot.py RUN_DIR [--out FILE]."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def plot_rewards(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Mean reward (and each task's) against the iteration, from `RUN_DIR/metrics.jsonl`."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    run_dir = Path(run_dir)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    figure, axis = plt.subplots(figsize=(7, 4), dpi=120)
    steps = [row["step"] for row in rows]
    axis.plot(steps, [row["reward_mean"] for row in rows], color="black", linewidth=2, label="mean")
    for task in sorted({key for row in rows for key in row if key.startswith("reward/")}):
        points = [(row["step"], row[task]) for row in rows if task in row]
        axis.plot(*zip(*points, strict=True), linewidth=1, alpha=0.7, label=task.removeprefix("reward/"))
    axis.set_xlabel("iteration")
    axis.set_ylabel("reward")
    axis.set_title(f"{run_dir.name}: reward")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
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
