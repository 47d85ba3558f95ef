"""Samples one at a time from several sources, mixed by sample counts (each source's share of the samples
follows its weight), for readers that do not pack: RL prompts (rl/prompts.py) and preference pairs
(train/reward_data.py). Its state (each source's cursor, the mixture's counts, the skips) resumes it
exactly: nothing is read twice or passed over."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import asdict
from typing import TypeVar

from step3vl_train.data.config import SourceConfig
from step3vl_train.data.mixture import TokenMixture
from step3vl_train.data.schema import Sample
from step3vl_train.data.skips import SkipLog, SkippedSample
from step3vl_train.data.sources import SourceCursor, SourceReader, resolve_shards

Item = TypeVar("Item")
MAX_SKIPS_IN_A_ROW = 1000  # skips before anything usable: the sources are not what the reader needs


class MixedSamples:
    def __init__(
        self,
        sources: list[SourceConfig],
        root: str | None,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        max_epochs: int | None = None,
    ):
        """Rank `rank` of `world_size` reads its own slice of every source; `max_epochs` None repeats the
        sources forever, 1 reads each once."""
        self.readers = {
            source.name: SourceReader(source, resolve_shards(source, root), rank, world_size, seed, max_epochs)
            for source in sources
        }
        self.skip_log = SkipLog()  # logs each bad key once; what it has seen survives `rewind`
        self.rewind()

    def rewind(self) -> None:
        """Back to the start of every source, counts cleared."""
        for reader in self.readers.values():
            reader.restore(SourceCursor())
        self.mixture = TokenMixture(list(self.readers), [reader.source.weight for reader in self.readers.values()])
        self.exhausted: set[str] = set()
        self.taken = 0  # items handed out
        self.skips: Counter[str] = Counter()  # encounters by reason; skip_log.unique() counts distinct keys

    def take(self, size: int, prepare: Callable[[Sample, str], Item], what: str) -> list[Item]:
        """`size` items, `prepare(sample, source name)` of the next samples in mixture order, or fewer once
        every source has ended. A sample `prepare` refuses (SkippedSample) is skipped, logged and counted."""
        items, skipped = [], 0
        while len(items) < size and len(self.exhausted) < len(self.readers):
            name = self.mixture.pick(set(self.readers) - self.exhausted)
            sample = self.readers[name].next()
            if sample is None:
                self.exhausted.add(name)
                continue
            try:
                if isinstance(sample, SkippedSample):
                    raise sample
                items.append(prepare(sample, name))
            except SkippedSample as skip:
                self.skip_log.record(skip.record(name))
                self.skips[skip.reason] += 1
                skipped += 1
                if skipped > MAX_SKIPS_IN_A_ROW and not items:
                    raise RuntimeError(
                        f"{what} sources yield nothing usable; skips so far: {dict(self.skips)}"
                    ) from skip
                continue
            self.mixture.add(name, 1)
        self.taken += len(items)
        return items

    def state_dict(self) -> dict:
        return {
            "cursors": {name: asdict(reader.cursor) for name, reader in self.readers.items()},
            "mixture": self.mixture.state_dict(),
            "exhausted": sorted(self.exhausted),
            "taken": self.taken,
            "skips": dict(self.skips),
            "skipped_keys": dict(self.skip_log.seen),
        }

    def load_state_dict(self, state: dict, what: str) -> None:
        if set(state["cursors"]) != set(self.readers):
            saved, configured = sorted(state["cursors"]), sorted(self.readers)
            raise ValueError(f"the checkpoint has {what} sources {saved}, the config {configured}")
        for name, cursor in state["cursors"].items():
            self.readers[name].restore(SourceCursor(**cursor))
        self.mixture.load_state_dict(state["mixture"])
        # States written before this class lack the last three (RL prompts never run out in training).
        self.exhausted = set(state.get("exhausted", []))
        self.taken = state.get("taken", 0)
        self.skips = Counter(state["skips"])
        self.skip_log.seen = dict(state.get("skipped_keys", {}))
