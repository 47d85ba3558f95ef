"""Metrics of rank 0: one JSON object per logged step in `<run>/metrics.jsonl`, and the same rows in W&B."""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path

from step3vl_train.train.config import LoggingConfig


class MetricsLog:
    def __init__(self, run_dir: str | Path, resume_step: int, logging: LoggingConfig, config: dict):
        """Rows past `resume_step` came from a run that died after its last checkpoint; they are dropped,
        so the file reads as one uninterrupted run. The W&B run is resumed under the id kept in the run
        directory."""
        run_dir = Path(run_dir)
        self.path = run_dir / "metrics.jsonl"
        truncate_jsonl(self.path, resume_step)
        self.wandb = _start_wandb(run_dir, logging, config)

    def write(self, row: dict) -> None:
        with self.path.open("a") as handle:
            handle.write(json.dumps(row) + "\n")
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in row.items() if v is not None}, step=row["step"])

    def predictions(self, step: int, rows: list[dict]) -> None:
        """Answers to the fixed prompts: `predictions.jsonl`, and a W&B table with the images."""
        with (self.path.parent / "predictions.jsonl").open("a") as handle:
            for row in rows:
                handle.write(json.dumps({"step": step, **row}) + "\n")
        if self.wandb is not None:
            import wandb

            table = wandb.Table(columns=["step", "image", "prompt", "prediction"])
            for row in rows:
                image = wandb.Image(row["image"]) if row.get("image") else None
                table.add_data(step, image, row["text"], row["prediction"])
            self.wandb.log({"predictions": table}, step=step)

    def close(self) -> None:
        if self.wandb is not None:
            self.wandb.finish()


def truncate_jsonl(path: Path, step: int) -> None:
    """Drops the rows of a JSONL log whose `step` is past `step` (written after the last checkpoint)."""
    if path.exists():
        lines = path.read_text().splitlines()
        kept = [line for line in lines if line and json.loads(line)["step"] <= step]
        path.write_text("".join(line + "\n" for line in kept))


def _start_wandb(run_dir: Path, logging: LoggingConfig, config: dict):
    mode = logging.mode or ("online" if os.environ.get("WANDB_API_KEY") else "offline")
    if mode == "disabled":
        return None
    import wandb

    id_file = run_dir / "wandb_id"
    run_id = id_file.read_text().strip() if id_file.exists() else uuid.uuid4().hex[:12]
    id_file.write_text(run_id)
    return wandb.init(
        project=logging.project,
        name=logging.name or run_dir.name,
        tags=list(logging.tags),
        config=config,
        dir=str(run_dir),
        id=run_id,
        resume="allow",
        mode=mode,
        settings=wandb.Settings(quiet=True),  # no run-history table on the console at the end
    )
