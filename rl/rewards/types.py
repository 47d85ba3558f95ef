"""What a reward function is given and what scoring returns."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

# Outcomes of scoring one response. "ok", the guards' outcomes and "injection" (the response tried to
# instruct the model verifier; scored 0) are the model's doing; a timeout or an error is the scorer's
# failure, and such responses are left out of the update rather than scored 0.
STATUSES = ("ok", "truncated", "no_reasoning", "multiple_answers", "no_answer", "injection", "timeout", "error")
SCORER_FAILURES = ("timeout", "error")


class NoAnswerError(ValueError):
    """Raised by a reward: the response holds no answer it can read (status "no_answer", score 0)."""


@dataclass
class RewardRequest:
    response: str  # the decoded completion, reasoning included
    reward: str  # the reward's name in the registry (the sample's `reward` field)
    answer: Any = None
    boxes: list[list[float]] = field(default_factory=list)  # pixels of the first image
    points: list[list[float]] = field(default_factory=list)
    image_size: tuple[int, int] | None = None  # (width, height) of the first image
    truncated: bool = False  # the response stopped at the length limit
    prompt: str = ""  # the question as text, for model-based verifiers


@dataclass
class RewardResult:
    score: float
    status: str = "ok"
    detail: str = ""

    @property
    def valid(self) -> bool:
        """False where the scorer failed, not the model: such a response takes no part in the update."""
        return self.status not in SCORER_FAILURES
