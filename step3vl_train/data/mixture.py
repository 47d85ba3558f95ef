"""Which source the next sample comes from, so that each source's share of tokens follows its weight.

Weights count tokens of samples as they enter packing (after placeholder expansion and truncation);
packing keeps every sample, so the packed stream carries the same shares. The rule is deterministic (no
random draws): the next sample comes from the source furthest below its target share of the tokens so
far, so the realised shares track the targets from the first window on.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence


class TokenMixture:
    def __init__(self, names: Sequence[str], weights: Sequence[float]):
        total = float(sum(weights))
        self.names = list(names)
        self.targets = {name: weight / total for name, weight in zip(names, weights, strict=True)}
        self.tokens = dict.fromkeys(names, 0)

    def pick(self, active: Collection[str]) -> str:
        """The active source furthest behind its share; ties go to the one listed first. A source of
        weight 0 is never picked."""
        total = sum(self.tokens.values())
        candidates = [name for name in self.names if name in active and self.targets[name] > 0]
        if not candidates:
            raise ValueError("no active source to draw from")
        return max(
            candidates, key=lambda name: (self.targets[name] * total - self.tokens[name], -self.names.index(name))
        )

    def add(self, name: str, tokens: int) -> None:
        self.tokens[name] += tokens

    def state_dict(self) -> dict[str, int]:
        return dict(self.tokens)

    def load_state_dict(self, state: dict[str, int]) -> None:
        if set(state) != set(self.names):
            raise ValueError(f"mixture state has sources {sorted(state)}, the config {sorted(self.names)}")
        self.tokens = dict(state)
