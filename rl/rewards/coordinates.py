"""Boxes and points as a response writes them: bracketed lists of numbers, bare or inside JSON.

A coordinate is a list of exactly 2 numbers (a point) or 4 (a box); lists of other lengths, and numbers
outside brackets or parentheses ("There are 2 cats:", the 2 of `point_2d`), are not coordinates.
"""

from __future__ import annotations

import json
import math
import re

from rl.rewards.answer import boxed_contents, split_reasoning
from rl.rewards.types import NoAnswerError, RewardRequest

COORDINATE_LENGTHS = (2, 4)
# No thousands separators: in `[100,100,300,300]` each comma separates two coordinates.
_NUMBER = r"-?\d+(?:\.\d+)?"
# `[x0, y0, x1, y1]`, `[x0 y0 x1 y1]` or `(x, y)`; an outer bracket around such lists is read past.
FLAT_LIST = re.compile(
    rf"\[\s*({_NUMBER}(?:\s*,\s*{_NUMBER}|\s+{_NUMBER})*)\s*\]|\(\s*({_NUMBER}(?:\s*,\s*{_NUMBER})*)\s*\)"
)
OPENER = re.compile(r"[\[{(]")
_json = json.JSONDecoder()


def coordinate_lists(text: str) -> list[list[float]]:
    """Every point `[x, y]` and box `[x0, y0, x1, y1]` in `text`, in order, as written (no unit conversion).

    JSON where it parses: lists of numbers at any depth, under any key (`{"bbox_2d": [...], "label": "cat"}`,
    a list of such objects, `[[x0, y0, x1, y1], ...]`); strings inside JSON are never read. Elsewhere
    (Python reprs, `<box>[...]</box>`, prose), lists in square brackets separated by commas or spaces, and
    lists in parentheses separated by commas.
    """
    found: list[list[float]] = []
    at = 0
    while match := OPENER.search(text, at):
        start = match.start()
        if text[start] in "[{":
            try:
                value, end = _json.raw_decode(text, start)
            except json.JSONDecodeError:
                pass
            else:
                found += _json_number_lists(value)
                at = end
                continue
        if flat := FLAT_LIST.match(text, start):
            found.append([float(n) for n in re.findall(_NUMBER, flat.group(1) or flat.group(2))])
            at = flat.end()
        else:
            at = start + 1
    return [values for values in found if len(values) in COORDINATE_LENGTHS]


def _json_number_lists(value) -> list[list[float]]:
    if isinstance(value, dict):
        return [values for item in value.values() for values in _json_number_lists(item)]
    if not isinstance(value, list):
        return []
    if value and all(_is_number(item) for item in value):
        return [[float(item) for item in value]]
    return [values for item in value for values in _json_number_lists(item)]


def _is_number(value) -> bool:
    # json reads NaN and Infinity; neither is a coordinate
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def answer_coordinates(request: RewardRequest, length: int) -> list[list[float]]:
    """The response's coordinates of `length` numbers (2: points, 4: boxes), read from its final answer
    (after the last `</think>`): inside its `\\boxed{}`s where they hold any, else the whole final answer,
    every line of it. Raises `NoAnswerError` when there are none."""
    final = split_reasoning(request.response)[1]
    for text in ("\n".join(boxed_contents(final)), final):
        found = [values for values in coordinate_lists(text) if len(values) == length]
        if found:
            return found
    kind = "point [x, y]" if length == 2 else "box [x0, y0, x1, y1]"
    raise NoAnswerError(f"no {kind} in the final answer")
