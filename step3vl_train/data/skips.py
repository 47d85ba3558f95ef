"""Why a sample or shard is left out. Every skip is counted by reason; each skipped key is logged once,
with its reason, at a bounded rate."""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

logger = logging.getLogger("step3vl_train.data")

SKIP_REASONS = (
    "malformed_json",  # the sample's JSON does not parse
    "bad_schema",  # parses, but breaks the sample schema (docs/data.md)
    "missing_image",  # the JSON has an image its sample lacks
    "corrupt_image",  # an image that does not decode
    "placeholder_mismatch",  # more images than `{"type": "image"}` parts, or the chat template lost one
    "too_long",  # longer than the sequence length under `overflow: skip`, or nothing left to learn once cut
    "too_many_images",  # more images or ViT views than one pack may hold
    "no_messages",  # a PaCoRe prompt whose pool holds no message its synthesis may be given
    "unreadable_shard",  # a shard that cannot be opened or ends mid-sample; counted once a shard
)


@dataclass(frozen=True)
class SkipRecord:
    """One encounter of a skipped sample, as plain data (it crosses from DataLoader workers to the loader)."""

    source: str
    key: str
    reason: str
    detail: str


class SkippedSample(Exception):
    """Raised where a sample (or shard) is found unusable; `reason` is one of SKIP_REASONS."""

    def __init__(self, reason: str, key: str, detail: str):
        if reason not in SKIP_REASONS:
            raise ValueError(f"unknown skip reason {reason!r}")
        super().__init__(f"{key}: {reason}: {detail}")
        self.reason = reason
        self.key = key
        self.detail = detail

    def record(self, source: str) -> SkipRecord:
        return SkipRecord(source, self.key, self.reason, self.detail)


class SkipLog:
    """Logs each skipped key the first time it is met, with source and reason; later encounters of the
    key are not logged. At most `lines_per_minute` keys are logged one by one in a minute; the keys over
    that are counted by reason and reported in one line when the next minute's first new key arrives, or
    at `flush()`. `seen` (key -> reason, bad keys only) is the state that keeps this true across a resume.
    """

    def __init__(self, lines_per_minute: int = 10, clock: Callable[[], float] = time.monotonic):
        self.lines_per_minute = lines_per_minute
        self.clock = clock
        self.seen: dict[str, str] = {}
        self._minute_start: float | None = None
        self._logged = 0
        self._held: Counter[str] = Counter()

    def record(self, skip: SkipRecord) -> None:
        if skip.key in self.seen:
            return
        self.seen[skip.key] = skip.reason
        now = self.clock()
        if self._minute_start is None or now - self._minute_start >= 60:
            self.flush()
            self._minute_start, self._logged = now, 0
        if self._logged < self.lines_per_minute:
            self._logged += 1
            logger.warning("skipped %s (%s, source %s): %s", skip.key, skip.reason, skip.source, skip.detail)
        else:
            self._held[skip.reason] += 1

    def flush(self) -> None:
        """Reports the keys held back by the rate limit."""
        if self._held:
            logger.warning(
                "... and %d more skipped samples not logged one by one (at most %d a minute): %s",
                sum(self._held.values()),
                self.lines_per_minute,
                dict(sorted(self._held.items())),
            )
            self._held.clear()

    def unique(self) -> Counter[str]:
        """Distinct skipped keys by reason."""
        return Counter(self.seen.values())
