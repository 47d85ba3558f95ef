"""Rule-based rewards for answers in text (math, choice, counting, numeric): pure functions of a
`RewardRequest` returning a score in [0, 1]; boxes and points are `grounding.py`'s.

They raise `NoAnswerError` when the response holds nothing to score. They run in worker processes
(see `scorer.py`), since math-verify's own timeouts rely on signals, which only work in a main thread.
"""

from __future__ import annotations

import math
import re

from rl.rewards.answer import BOXED, boxed_contents, final_answer, split_reasoning
from rl.rewards.types import NoAnswerError, RewardRequest

NUMBER = re.compile(r"-?\d+(?:,\d{3})*(?:\.\d+)?(?:[eE][-+]?\d+)?")
NUMBER_WORDS = {
    w: i
    for i, w in enumerate(
        "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
        "seventeen eighteen nineteen twenty".split()
    )
}


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
