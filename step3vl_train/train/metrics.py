"""Metrics of rank 0: one JSON object per logged step in `<run>/metrics.jsonl`, and the same rows in W&B.

A run that died after its last checkpoint logged rows that the resumed run logs again. On resume every log
is rewound to the checkpoint's step, so that it reads as one uninterrupted run: the jsonl files are
truncated, and W&B, which drops a step at or below the last one it holds, is rewound (online) or replaced
by a new run linked to the old one that first replays the kept rows (offline, where W&B cannot rewind).
"""

from __future__ import annotations

import json
import logging as log
import os
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path

from step3vl_train.train.checkpoint import write_atomically
from step3vl_train.train.config import LoggingConfig

logger = log.getLogger("step3vl_train.train")

METRICS = "metrics.jsonl"
PREDICTIONS = "predictions.jsonl"
WANDB_RUN = "wandb.json"  # the W&B run this directory logs to now: WandbRun's fields


class MetricsLog:
    def __init__(self, run_dir: str | Path, resume_step: int, logging: LoggingConfig, config: dict):
        """Rows past `resume_step` came from a run that died after its last checkpoint; they are dropped
        from metrics.jsonl, predictions.jsonl and W&B."""
        run_dir = Path(run_dir)
        self.path = run_dir / METRICS
        self.predictions_path = run_dir / PREDICTIONS
        # W&B first: a crash before the truncation leaves the rows that tell the next start to rewind.
        self.wandb = _start_wandb(run_dir, resume_step, logging, config)
        for path in (self.path, self.predictions_path):
            truncate_jsonl(path, resume_step)

    def write(self, row: dict) -> None:
        with self.path.open("a") as handle:
            handle.write(json.dumps(row) + "\n")
        if self.wandb is not None:
            _log_row(self.wandb, row)

    def predictions(self, step: int, rows: list[dict]) -> None:
        """Answers to the fixed prompts, [{"image": path or None, "text", "prediction"}]: `predictions.jsonl`,
        and a W&B table with the images."""
        with self.predictions_path.open("a") as handle:
            for row in rows:
                handle.write(json.dumps({"step": step, **row}) + "\n")
        if self.wandb is not None:
            _log_predictions(self.wandb, step, rows)

    def close(self) -> None:
        if self.wandb is not None:
            self.wandb.finish()


def read_jsonl(path: Path) -> list[dict]:
    """The rows of a JSONL log, each with its `step`."""
    return [json.loads(line) for line in _whole_lines(path)]


def truncate_jsonl(path: Path, step: int) -> None:
    """Drops the rows of a JSONL log whose `step` is past `step` (written after the last checkpoint). A kill at
    any moment leaves either the old file or the new one."""
    if path.exists():
        kept = [line for line in _whole_lines(path) if json.loads(line)["step"] <= step]
        write_atomically(path, "".join(line + "\n" for line in kept))


def _whole_lines(path: Path) -> list[str]:
    """A last line without its newline was torn by a kill, and is left out."""
    if not path.exists():
        return []
    return [line for line in path.read_text().split("\n")[:-1] if line]


@dataclass(frozen=True)
class WandbRun:
    run_id: str
    group: str  # shared by every W&B run of this run directory: the first one's id

    @staticmethod
    def read(run_dir: Path) -> WandbRun | None:
        path = run_dir / WANDB_RUN
        return WandbRun(**json.loads(path.read_text())) if path.exists() else None

    def write(self, run_dir: Path) -> None:
        write_atomically(run_dir / WANDB_RUN, json.dumps(asdict(self)) + "\n")


def _start_wandb(run_dir: Path, resume_step: int, logging: LoggingConfig, config: dict):
    """Online, the W&B run of `wandb.json` goes on: rewound to `resume_step` when it logged past it (W&B keeps
    its rows at steps <= resume_step and takes new ones from resume_step + 1), resumed as it is when not.
    Offline, and online where W&B refuses that (rewind is a preview feature), a new run in the same group
    starts, with `resumed_from` in its config, and replays the jsonl rows up to `resume_step`: syncing a
    rewound offline run would erase the rows before the rewind (wandb issue #5865)."""
    mode = logging.mode or ("online" if os.environ.get("WANDB_API_KEY") else "offline")
    if mode == "disabled":
        return None
    import wandb

    metrics, predictions = read_jsonl(run_dir / METRICS), read_jsonl(run_dir / PREDICTIONS)
    logged_past = any(row["step"] > resume_step for row in metrics + predictions)
    previous = WandbRun.read(run_dir)
    arguments = dict(
        project=logging.project,
        name=logging.name or run_dir.name,
        tags=list(logging.tags),
        dir=str(run_dir),
        mode=mode,
        settings=wandb.Settings(quiet=True),  # no run-history table on the console at the end
    )
    if previous is not None and mode == "online":
        try:
            if logged_past:
                resume = {"resume_from": f"{previous.run_id}?_step={resume_step}"}
            else:
                resume = {"id": previous.run_id, "resume": "must"}
            return wandb.init(**arguments, group=previous.group, config=config, **resume)
        except wandb.errors.Error as error:
            logger.warning("W&B refused to go on with run %s (%s); a new run replays it", previous.run_id, error)
    run_id = uuid.uuid4().hex[:12]
    group = previous.group if previous is not None else run_id
    if previous is not None:
        config = {**config, "resumed_from": {"run_id": previous.run_id, "step": resume_step}}
    run = wandb.init(**arguments, group=group, config=config, id=run_id)
    _replay(run, metrics, predictions, resume_step)
    # Only once the replay is whole: a start that dies during it replays again into another new run.
    WandbRun(run_id, group).write(run_dir)
    return run


def _replay(run, metrics: list[dict], predictions: list[dict], step: int) -> None:
    """Logs the rows up to `step` again, each step's metrics and then its answers."""
    rows = {row["step"]: row for row in metrics if row["step"] <= step}
    answers: dict[int, list[dict]] = {}
    for row in predictions:
        if row["step"] <= step:
            answers.setdefault(row["step"], []).append(row)
    for logged in sorted(rows.keys() | answers.keys()):
        if logged in rows:
            _log_row(run, rows[logged])
        if logged in answers:
            _log_predictions(run, logged, answers[logged])


def _log_row(run, row: dict) -> None:
    run.log({k: v for k, v in row.items() if v is not None}, step=row["step"])


def _log_predictions(run, step: int, rows: list[dict]) -> None:
    import wandb

    table = wandb.Table(columns=["step", "image", "prompt", "prediction"])
    for row in rows:
        # A replay may find the image gone; the answer still counts.
        image = wandb.Image(row["image"]) if row.get("image") and Path(row["image"]).is_file() else None
        table.add_data(step, image, row["text"], row["prediction"])
    run.log({"predictions": table}, step=step)
