"""What a reward function is given and what scoring returns."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

# Outcomes of scoring one response. "ok", the guards' outcomes and "injection" (the response tried to
# instruct the model verifier; scored 0) are the model's doing; a timeout, an error or a judge's reply that
# does not parse ("unparsed") is the scorer's failure, and such responses are left out of the update
# rather than scored.
STATUSES = (
    "ok", "truncated", "no_reasoning", "multiple_answers", "no_answer", "injection", "timeout", "error", "unparsed",
)  # fmt: skip
SCORER_FAILURES = ("timeout", "error", "unparsed")


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
    messages: list[dict[str, Any]] | None = None  # the prompt as sent to the policy, for the reward-model service
    images: list[bytes] = field(default_factory=list)  # encoded, in the order of the messages' image parts
    reference: str | None = None  # a stronger model's response, the GenRM's anchor


@dataclass
class RewardResult:
    score: float
    status: str = "ok"
    detail: str = ""
    components: dict[str, float] = field(default_factory=dict)  # the parts of a combined reward, by name

    @property
    def valid(self) -> bool:
        """False where the scorer failed, not the model: such a response takes no part in the update."""
        return self.status not in SCORER_FAILURES
