"""Metrics: one JSON object per logged step in `<run>/metrics.jsonl`, written by rank 0."""

from __future__ import annotations

import json
from pathlib import Path


class MetricsLog:
    def __init__(self, run_dir: str | Path, resume_step: int):
        """Rows past `resume_step` came from a run that died after its last checkpoint; they are dropped,
        so the file reads as one uninterrupted run."""
        self.path = Path(run_dir) / "metrics.jsonl"
        if self.path.exists():
            kept = [
                line for line in self.path.read_text().splitlines() if line and json.loads(line)["step"] <= resume_step
            ]
            self.path.write_text("".join(line + "\n" for line in kept))

    def write(self, row: dict) -> None:
        with self.path.open("a") as handle:
            handle.write(json.dumps(row) + "\n")
