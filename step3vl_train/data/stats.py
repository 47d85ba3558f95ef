"""Running totals of what the data pipeline delivered and what it left out."""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field


@dataclass
class DataStats:
    samples: int = 0  # samples emitted in packs
    tokens: int = 0  # their tokens
    loss_tokens: int = 0  # tokens that are targets
    slots: int = 0  # packs x seq_len: what the tokens could have filled
    packs: int = 0
    images: int = 0
    views: int = 0  # ViT inputs: global views + crops
    truncated: int = 0  # samples cut to seq_len
    text_tokens: int = 0  # tokens of samples without images
    source_tokens: Counter = field(default_factory=Counter)
    skips: Counter = field(default_factory=Counter)  # reason -> count

    def merge(self, other: DataStats) -> DataStats:
        merged = DataStats(**{name: getattr(self, name) + getattr(other, name) for name in _SCALARS})
        merged.source_tokens = self.source_tokens + other.source_tokens
        merged.skips = self.skips + other.skips
        return merged

    def copy(self) -> DataStats:
        return DataStats().merge(self)

    @property
    def packing_efficiency(self) -> float:
        return self.tokens / self.slots if self.slots else 0.0

    def summary(self) -> dict:
        """Flat metrics: totals, packing efficiency, realised token shares and skips by reason."""
        shares = {f"share/{name}": n / self.tokens for name, n in sorted(self.source_tokens.items())}
        skips = {f"skipped/{reason}": n for reason, n in sorted(self.skips.items())}
        totals = {name: getattr(self, name) for name in _SCALARS}
        return {
            **totals,
            "skipped_samples": sum(n for reason, n in self.skips.items() if reason != "unreadable_shard"),
            "packing_efficiency": round(self.packing_efficiency, 4),
            "text_share": round(self.text_tokens / self.tokens, 4) if self.tokens else 0.0,
            **{k: round(v, 4) for k, v in shares.items()},
            **skips,
        }

    def state_dict(self) -> dict:
        return {**asdict(self), "source_tokens": dict(self.source_tokens), "skips": dict(self.skips)}

    @classmethod
    def from_state_dict(cls, state: dict) -> DataStats:
        stats = cls(**{name: state[name] for name in _SCALARS})
        stats.source_tokens = Counter(state["source_tokens"])
        stats.skips = Counter(state["skips"])
        return stats


_SCALARS = ("samples", "tokens", "loss_tokens", "slots", "packs", "images", "views", "truncated", "text_tokens")
