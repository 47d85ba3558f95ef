"""results.jsonl: a line a problem and mode, appended as each batch is scored, so that a rerun of the same
command resumes where an interrupted one stopped."""

from __future__ import annotations

import json
from pathlib import Path

from rl.evaluation.accuracy import ProblemScores
from step3vl_train.usage import UsageError


def read_scored(path: Path) -> dict[tuple[str, str], ProblemScores]:
    """What an earlier run scored, by (key, mode). A last line without its newline was torn by the
    interruption: it is cut off the file, so that appending starts a fresh line, and its problem is scored
    again. A line torn elsewhere is not ours to mend: a UsageError names it."""
    if not path.exists():
        return {}
    data = path.read_bytes()
    whole = data[: data.rfind(b"\n") + 1]
    if len(whole) < len(data):
        with path.open("r+b") as file:
            file.truncate(len(whole))
    scored = {}
    for number, line in enumerate(whole.decode().splitlines(), start=1):
        try:
            record = json.loads(line)
            scored[record["key"], record["mode"]] = ProblemScores.of(record)
        except (json.JSONDecodeError, KeyError, TypeError) as error:
            raise UsageError(
                f"{path}:{number} is not a result line ({error}): remove it, or give another out="
            ) from error
    return scored
