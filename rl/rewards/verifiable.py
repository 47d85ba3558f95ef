"""Rule-based rewards: pure functions of a `RewardRequest` returning a score in [0, 1].

They raise `NoAnswerError` when the response holds nothing to score. They run in worker processes
(see `pool.py`), since math-verify's own timeouts rely on signals, which only work in a main thread.
"""

from __future__ import annotations

import math
import re

from rl.rewards.answer import BOXED, boxed_contents, final_answer, split_reasoning
from rl.rewards.types import RewardRequest

NUMBER = re.compile(r"-?\d+(?:,\d{3})*(?:\.\d+)?(?:[eE][-+]?\d+)?")
NUMBER_WORDS = {
    w: i
    for i, w in enumerate(
        "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
        "seventeen eighteen nineteen twenty".split()
    )
}


class NoAnswerError(ValueError):
    """The response holds no answer the reward can read."""


def answer_text(request: RewardRequest) -> str:
    """What the response answers: after the last `</think>`, the last `\\boxed{}` or else the last line."""
    final = split_reasoning(request.response)[1]
    if BOXED.search(final) and not boxed_contents(final):
        raise NoAnswerError("a \\boxed{ that is never closed")
    text = final_answer(final)
    if not text:
        raise NoAnswerError("empty answer")
    return text


def math_reward(request: RewardRequest) -> float:
    """math-verify's equivalence (fractions, decimals, intervals, sets, units, LaTeX) of the final answer
    with the reference answer."""
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify
    from math_verify.parser import NormalizationConfig

    configs = [
        LatexExtractionConfig(normalization_config=NormalizationConfig(units=True), boxed_match_priority=0),
        ExprExtractionConfig(),
    ]
    gold = parse(f"\\boxed{{{request.answer}}}", extraction_config=configs)
    if not gold:
        raise ValueError(f"the reference answer {request.answer!r} does not parse")
    text = answer_text(request)
    boxed = bool(boxed_contents(split_reasoning(request.response)[1]))
    predicted = parse(f"\\boxed{{{text}}}" if boxed else text, extraction_config=configs)
    if not predicted:
        raise NoAnswerError(f"no mathematical answer in {text!r}")
    return float(verify(gold, predicted))


def choice_reward(request: RewardRequest) -> float:
    """Multiple choice: the letter answered (`B`, `(B)`, `B.`, `B) text`) against the reference letter."""
    match = re.match(r"^\(?([A-Za-z])(?:\)|\.|:|\s|$)", answer_text(request))
    if not match:
        raise NoAnswerError("no option letter")
    return float(match.group(1).upper() == str(request.answer).strip().strip("()").upper())


def counting_reward(request: RewardRequest) -> float:
    """An exact count: the last integer (or number word up to twenty) in the answer."""
    text = answer_text(request).lower()
    found = [(m.start(), m.group()) for m in re.finditer(r"-?\d+(?:\.\d+)?|[a-z]+", text)]
    counts = [int(float(tok)) if tok[-1].isdigit() else NUMBER_WORDS[tok] for _, tok in found if _is_count(tok)]
    if not counts:
        raise NoAnswerError("no count")
    return float(counts[-1] == int(request.answer))


def _is_count(token: str) -> bool:
    return token in NUMBER_WORDS or (token[-1].isdigit() and float(token).is_integer())


def numeric_reward(request: RewardRequest, rel_tol: float = 1e-2, abs_tol: float = 0.0) -> float:
    """The last number of the answer within `rel_tol` (relative) or `abs_tol` of the reference;
    a trailing % is read as percent of the reference's own scale (`50%` matches `50`)."""
    numbers = NUMBER.findall(answer_text(request))
    if not numbers:
        raise NoAnswerError("no number")
    value = float(numbers[-1].replace(",", ""))
    return float(math.isclose(value, float(request.answer), rel_tol=rel_tol, abs_tol=abs_tol))


# ---- grounding: boxes and points ------------------------------------------------------------------------
# Coordinates in a response are `coords: norm1000` (0-1000 over the image's width and height, as in our
# synthetic data and Qwen-VL-style models) or `coords: pixels`. Reference `boxes`/`points` are pixels.

COORDS = ("norm1000", "pixels")


def response_numbers(request: RewardRequest) -> list[float]:
    return [float(n.replace(",", "")) for n in NUMBER.findall(answer_text(request))]


def to_pixels(values: list[float], request: RewardRequest, coords: str) -> list[float]:
    if coords not in COORDS:
        raise ValueError(f"coords must be one of {COORDS}, not {coords!r}")
    if coords == "pixels":
        return values
    if request.image_size is None:
        raise ValueError("norm1000 coordinates need the image size")
    width, height = request.image_size
    return [v * (width if i % 2 == 0 else height) / 1000 for i, v in enumerate(values)]


def box_iou(a: list[float], b: list[float]) -> float:
    inter_w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    inter_h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = inter_w * inter_h
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def grounding_reward(request: RewardRequest, coords: str = "norm1000", iou_threshold: float = 0.5) -> float:
    """Boxes `[x0, y0, x1, y1]` in the answer matched greedily to the reference boxes by IoU. Each match
    scores its IoU, or 0 below `iou_threshold` (strict shaping). The sum is divided by the larger count,
    so extra or missing boxes cost. A box that is inverted or off the image scores 0."""
    numbers = response_numbers(request)
    if len(numbers) < 4 or len(numbers) % 4:
        raise NoAnswerError(f"{len(numbers)} numbers do not make boxes")
    values = to_pixels(numbers, request, coords)
    predicted = [values[i : i + 4] for i in range(0, len(values), 4)]
    predicted = [box for box in predicted if _valid_box(box, request.image_size)]
    remaining = [list(map(float, box)) for box in request.boxes]
    total = 0.0
    for box in predicted:
        if not remaining:
            break
        best = max(remaining, key=lambda ref: box_iou(box, ref))
        iou = box_iou(box, best)
        total += iou if iou >= iou_threshold else 0.0
        remaining.remove(best)
    return total / max(len(numbers) // 4, len(request.boxes))


def _valid_box(box: list[float], image_size: tuple[int, int] | None) -> bool:
    if box[2] <= box[0] or box[3] <= box[1]:
        return False
    return image_size is None or _on_image(box[:2], image_size) and _on_image(box[2:], image_size)


def _on_image(point: list[float], image_size: tuple[int, int] | None) -> bool:
    return image_size is None or (0 <= point[0] <= image_size[0] and 0 <= point[1] <= image_size[1])


def pointing_reward(request: RewardRequest, coords: str = "norm1000", radius: float = 0.05) -> float:
    """Distance-decayed: 1 at the reference point, falling linearly to 0 at the decay radius. The radius is
    half the diagonal of the reference box where `boxes` has one (strict: a point outside the target's
    reach scores 0), otherwise `radius` times the image's diagonal. A point off the image scores 0."""
    numbers = response_numbers(request)
    if len(numbers) != 2:
        raise NoAnswerError(f"{len(numbers)} numbers are not one point")
    point = to_pixels(numbers, request, coords)
    if not request.points:
        raise ValueError("pointing needs reference points")
    if not _on_image(point, request.image_size):
        return 0.0
    target = request.points[0]
    if request.boxes:
        x0, y0, x1, y1 = request.boxes[0]
        reach = math.hypot(x1 - x0, y1 - y0) / 2
    elif request.image_size is not None:
        reach = radius * math.hypot(*request.image_size)
    else:
        raise ValueError("pointing needs a reference box or the image size")
    return max(0.0, 1.0 - math.dist(point, target) / reach)
