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


# A figure a doc quotes from the demo's output, tagged after it: `rises to 0.38<!--demo rlvr.reward.last-->`.
# A tag with several names takes as many numbers before it on its line, in order, `_` skipping one:
# `` `phase phase2 from 35,282 tokens (it starts at 35,000)`<!--demo pretrain.phase2.tokens _--> ``.
TAG = re.compile(r"<!--demo ([^>]*?)\s*-->")
NUMBER = re.compile(r"(?<![\w.])(\d{1,3}(?:,\d{3})+|\d+)(\.\d+)?(%|K|M)?(?!\w|\.\d)")
SCALE = {"": 1, "%": 0.01, "K": 1e3, "M": 1e6}


@dataclass
class Figure:
    document: str
    line: int
    name: str  # a key of the demo's figures.json (launch/demo_pipeline.py: figures)
    quoted: str  # as the doc writes it: 0.38, 35,282, 77%, 0.7M

    def value_and_unit(self) -> tuple[float, float]:
        """The quoted number and one unit of its last digit, both in the figure's own units."""
        whole, fraction, suffix = NUMBER.fullmatch(self.quoted).groups()
        scale = SCALE[suffix or ""]
        value = float(whole.replace(",", "") + (fraction or ""))
        return value * scale, 10.0 ** -(len(fraction) - 1 if fraction else 0) * scale

    def is_measure(self) -> bool:
        """A decimal or a percentage, not a count."""
        _, fraction, suffix = NUMBER.fullmatch(self.quoted).groups()
        return suffix == "%" or (fraction is not None and suffix is None)

    def __str__(self) -> str:
        return f"{self.document}:{self.line}: {self.quoted} ({self.name})"


def quoted_figures(documents: list[Path] = DOCUMENTS) -> list[Figure]:
    found = []
    for path in documents:
        name = str(path.relative_to(REPO)) if path.is_relative_to(REPO) else path.name
        for number, line in enumerate(path.read_text().splitlines(), start=1):
            start = 0
            for tag in TAG.finditer(line):
                names = tag.group(1).split()
                numbers = [m.group() for m in NUMBER.finditer(line[start : tag.start()])]
                if not names or len(numbers) < len(names):
                    raise ValueError(f"{name}:{number}: {tag.group()} names {len(names)} figures, {numbers} before it")
                quoted = numbers[len(numbers) - len(names) :]
                found += [Figure(name, number, n, q) for n, q in zip(names, quoted, strict=True) if n != "_"]
                start = tag.end()
    return found


# A run's measures repeat bit for bit on one machine, but a CPU with other vector units may round otherwise
# and sample other rollouts: a quoted measure (a decimal or a percentage) holds within this share of itself.
# Counts (tokens, steps, parameters) come from the data and the config: they hold to their last digit.
RELATIVE_TOLERANCE = 0.1


def drifted(quoted: list[Figure], produced: dict[str, float]) -> list[str]:
    """The quoted figures that are not what the demo produced, or that it did not produce. A measure holds
    to 10% or one unit of its last digit, whichever is wider (0.38 holds 0.342 to 0.418, 0.05 holds 0.04
    to 0.06); a count to one unit of its last digit (35,282 holds 35,281 to 35,283; 0.7M 0.6M to 0.8M)."""
    wrong = []
    for figure in quoted:
        if figure.name not in produced:
            wrong.append(f"{figure}: the demo produces no such figure")
            continue
        value, unit = figure.value_and_unit()
        tolerance = max(unit, RELATIVE_TOLERANCE * abs(value)) if figure.is_measure() else unit
        if abs(value - produced[figure.name]) > tolerance * (1 + 1e-9):
            wrong.append(f"{figure}: the demo gives {produced[figure.name]:.6g}")
    return wrong
