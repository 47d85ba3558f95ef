"""`pacore.*`: the settings shared by PaCoRe inference (`launch/pacore.py`), synthesis filtration
(`data/filter_synthesis.py`) and PaCoRe training (`rl/run.py stage=pacore`)."""

from __future__ import annotations

from dataclasses import dataclass, field

ORDERS = ("shuffle", "official")
OVER_BUDGET = ("drop", "skip")


@dataclass
class PaCoReConfig:
    # Inference: the parallel widths of the coordinated rounds; one synthesis round follows the last.
    # [16] is STEP3-VL's reported mode (16 rollouts, then the synthesis); [32, 4] is PaCoRe's "high".
    rounds: list[int] = field(default_factory=lambda: [16])
    # Training and synthesis filtration: |M| ~ U(low, high), drawn from the prompt's pool (fewer if it
    # holds fewer). [0, 0] gives no messages: the template is bypassed and the prompt is the problem.
    messages: list[int] = field(default_factory=lambda: [16, 24])
    # Reference order: `shuffle`, a shuffle seeded by (seed, problem, round); `official`, the official
    # code's sort by length then `random.Random(42).shuffle`, the same permutation for every problem.
    order: str = "shuffle"
    keep_unfinished: bool = False  # pass on responses cut at the length limit or without `</think>` (whole)
    max_message_tokens: int = 2048  # a longer conclusion keeps its head and tail around a marked elision
    max_synthesis_tokens: int = 24576  # the rendered synthesis text (the problem and its references)
    over_budget: str = "drop"  # references that do not fit: drop messages from the end, or skip the problem
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.rounds or any(width < 1 for width in self.rounds):
            raise ValueError(f"pacore.rounds must be a non-empty list of positive widths, not {self.rounds}")
        if len(self.messages) != 2 or not 0 <= self.messages[0] <= self.messages[1]:
            raise ValueError(f"pacore.messages must be [low, high] with 0 <= low <= high, not {self.messages}")
        if self.order not in ORDERS:
            raise ValueError(f"pacore.order must be one of {ORDERS}, not {self.order!r}")
        if self.over_budget not in OVER_BUDGET:
            raise ValueError(f"pacore.over_budget must be one of {OVER_BUDGET}, not {self.over_budget!r}")
        if self.max_message_tokens < 8:
            raise ValueError(f"pacore.max_message_tokens must be at least 8, not {self.max_message_tokens}")
