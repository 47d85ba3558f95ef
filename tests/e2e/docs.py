"""The shell commands of README.md and docs/*.md, read from their ```bash blocks, so that a doc that drifts
from the code fails a test. A block fenced ```bash gpu needs GPUs, models or data we do not have: its
commands are composed and checked, not run."""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from pathlib import Path

from tests.conftest import REPO

DOCUMENTS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
FENCE = re.compile(r"^```bash( gpu)?\s*$")


@dataclass
class Command:
    document: str  # README.md, docs/rl.md, ...
    line: int  # 1-based line of the command's first line
    text: str  # continuation lines joined, comments kept (bash ignores them)
    gpu: bool

    @property
    def words(self) -> list[str]:
        return shlex.split(self.text, comments=True)

    def __str__(self) -> str:
        return f"{self.document}:{self.line}: {self.text}"


def commands(documents: list[Path] = DOCUMENTS) -> list[Command]:
    found = []
    for path in documents:
        lines = path.read_text().splitlines()
        block = None
        pending: list[str] = []
        for number, line in enumerate(lines, start=1):
            if block is None:
                match = FENCE.match(line)
                block = match and bool(match.group(1))
                continue
            if line.startswith("```"):
                block = None
                continue
            if not pending and (not line.strip() or line.lstrip().startswith("#")):
                continue
            pending.append(line.rstrip().removesuffix("\\").rstrip())
            if not line.rstrip().endswith("\\"):
                first = number - len(pending) + 1
                name = str(path.relative_to(REPO)) if path.is_relative_to(REPO) else path.name
                found.append(Command(name, first, " ".join(p.strip() for p in pending), bool(block)))
                pending = []
    return found


def script_and_overrides(command: Command) -> tuple[str, list[str]]:
    """The Python script a command runs and the arguments after it (torchrun's own flags skipped)."""
    words = command.words
    if words[0] == "torchrun":
        position = next(i for i, word in enumerate(words) if word.endswith(".py"))
    elif words[0] == "python":
        position = 1
    else:
        raise ValueError(f"{command}: not a python or torchrun command")
    return words[position], words[position + 1 :]
