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
    skips: Counter = field(default_factory=Counter)  # reason -> encounters (a key met in each of 3 passes: 3)
    # reason -> distinct keys; only the loader knows them (PackedLoader.stats), a worker's are empty
    skipped_unique: Counter = field(default_factory=Counter)

    def merge(self, other: DataStats) -> DataStats:
        merged = DataStats(**{name: getattr(self, name) + getattr(other, name) for name in _SCALARS})
        merged.source_tokens = self.source_tokens + other.source_tokens
        merged.skips = self.skips + other.skips
        merged.skipped_unique = self.skipped_unique + other.skipped_unique
        return merged

    def copy(self) -> DataStats:
        return DataStats().merge(self)

    @property
    def packing_efficiency(self) -> float:
        return self.tokens / self.slots if self.slots else 0.0

    def summary(self) -> dict:
        """Flat metrics: totals, packing efficiency, realised token shares, and skips by reason: encounters
        (`skipped/<reason>`, `skipped_samples`) and distinct keys (`skipped_unique/<reason>`,
        `skipped_unique_samples`)."""
        shares = {f"share/{name}": n / self.tokens for name, n in sorted(self.source_tokens.items())}
        skips = {f"skipped/{reason}": n for reason, n in sorted(self.skips.items())}
        unique = {f"skipped_unique/{reason}": n for reason, n in sorted(self.skipped_unique.items())}
        totals = {name: getattr(self, name) for name in _SCALARS}
        return {
            **totals,
            "skipped_samples": _samples(self.skips),
            "skipped_unique_samples": _samples(self.skipped_unique),
            "packing_efficiency": round(self.packing_efficiency, 4),
            "text_share": round(self.text_tokens / self.tokens, 4) if self.tokens else 0.0,
            **{k: round(v, 4) for k, v in shares.items()},
            **skips,
            **unique,
        }

    def state_dict(self) -> dict:
        return {
            **asdict(self),
            "source_tokens": dict(self.source_tokens),
            "skips": dict(self.skips),
            "skipped_unique": dict(self.skipped_unique),
        }

    @classmethod
    def from_state_dict(cls, state: dict) -> DataStats:
        stats = cls(**{name: state[name] for name in _SCALARS})
        stats.source_tokens = Counter(state["source_tokens"])
        stats.skips = Counter(state["skips"])
        stats.skipped_unique = Counter(state.get("skipped_unique", {}))  # absent from states before unique counts
        return stats


def _samples(by_reason: Counter) -> int:
    """Skipped samples: all reasons but unreadable_shard, which counts shards."""
    return sum(n for reason, n in by_reason.items() if reason != "unreadable_shard")


_SCALARS = ("samples", "tokens", "loss_tokens", "slots", "packs", "images", "views", "truncated", "text_tokens")
