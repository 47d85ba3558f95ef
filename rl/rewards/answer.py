"""What a response answers: the text after its reasoning, and the content of its `\\boxed{}`s."""

from __future__ import annotations

import re

from step3vl_train.processing.chat import THINK_END, split_reasoning

__all__ = ["BOXED", "THINK_END", "boxed_contents", "final_answer", "split_reasoning"]

BOXED = re.compile(r"\\(?:boxed|fbox)\s*\{")


def boxed_contents(text: str) -> list[str]:
    """The contents of every `\\boxed{...}` in `text`, braces balanced; an unclosed one is left out."""
    contents = []
    for match in BOXED.finditer(text):
        depth, start = 1, match.end()
        for at in range(start, len(text)):
            depth += {"{": 1, "}": -1}.get(text[at], 0)
            if depth == 0:
                contents.append(text[start:at])
                break
    return contents


def final_answer(text: str) -> str:
    """The last boxed content, else the last non-empty line, stripped."""
    boxed = boxed_contents(text)
    if boxed:
        return boxed[-1].strip()
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else ""
