"""The packed sample stream of one DataLoader worker, resumable exactly.

A worker fills a window with samples from its sources (in mixture order) until they hold `window`
packs' worth of tokens, plans packs over the window,
and emits them one by one, decoding images only for the pack being emitted. Its state is the window's
starting point (source cursors, mixture and skip counts) plus how many of the window's packs are out:
a restored worker re-reads that window, plans the same packs and carries on with the next one. Nothing
emitted is emitted again, and nothing is passed over.

A worker counts its skips but does not log them: each pack carries the skips met since the previous
pack, and the loader, in the rank's main process, logs each key once (a key may reach several workers
over the epochs, and a restored worker meets its window's skips again).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field

import numpy as np
from torch.utils.data import IterableDataset, get_worker_info

from step3vl_train.data.config import DataConfig
from step3vl_train.data.encoding import EncodedSample, SampleEncoder
from step3vl_train.data.mixture import TokenMixture
from step3vl_train.data.packing import Pack, plan_packs
from step3vl_train.data.skips import SkippedSample, SkipRecord
from step3vl_train.data.sources import SourceCursor, SourceReader, resolve_shards
from step3vl_train.data.stats import DataStats
from step3vl_train.processing.processor import ProcessedSample, Step3VLProcessor

logger = logging.getLogger("step3vl_train.data")


@dataclass
class WindowStart:
    """Where a window began: all a worker needs to draw the same samples again."""

    index: int
    cursors: dict[str, dict]  # source name -> SourceCursor fields
    mixture: dict[str, int]  # the mixture's token counts
    filled: dict  # skip and truncation counts (a DataStats state)
    exhausted: list[str]  # sources that had run out
    phase: int = 0  # the mixture phase the window was drawn in (states before phases have none)


@dataclass
class Progress:
    """A worker's running window: its index, fill-time counts and the sources that ran out."""

    index: int = 0
    filled: DataStats = field(default_factory=DataStats)
    exhausted: list[str] = field(default_factory=list)
    phase: int = 0


class PackedStream(IterableDataset):
    def __init__(
        self,
        cfg: DataConfig,
        processor: Step3VLProcessor,
        rank: int,
        world_size: int,
        phase_weights: list[dict[str, float]] | None = None,
    ):
        """`phase_weights`: the mixture's weights by source name in each phase of the run (default: one
        phase, the sources' own weights); `phase` (set between iterations) is the one new windows use."""
        self.cfg = cfg
        self.phase_weights = phase_weights or [{source.name: source.weight for source in cfg.sources}]
        self.phase = 0
        self.encoder = SampleEncoder(processor, cfg.packing)
        self.rank = rank
        self.world_size = world_size
        self.shards = {source.name: resolve_shards(source, cfg.root) for source in cfg.sources}
        self._restored: dict | None = None
        self._state: dict | None = None

    # torchdata's StatefulDataLoader calls these inside each worker, between batches.
    def state_dict(self) -> dict:
        """{"reader", "window": WindowStart fields, "emitted": DataStats state, "delivered": packs out}."""
        return self._state if self._state is not None else self._restored or {}

    def load_state_dict(self, state: dict) -> None:
        self._restored = state or None

    def __iter__(self) -> Iterator[Pack]:
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info else (0, 1)
        reader = self.rank * num_workers + worker
        readers = [
            SourceReader(
                source,
                self.shards[source.name],
                reader,
                self.world_size * num_workers,
                self.cfg.seed,
                self.cfg.max_epochs,
            )
            for source in self.cfg.sources
        ]
        mixture = self._mixture(self.phase)
        progress, emitted, delivered = Progress(phase=self.phase), DataStats(), 0
        skipped: list[SkipRecord] = []  # met since the last pack out
        if self._restored:
            state = self._restored
            if state["reader"] != reader:
                raise ValueError(f"loader state belongs to reader {state['reader']}, this worker is reader {reader}")
            start = WindowStart(**state["window"])
            for source_reader in readers:
                source_reader.restore(SourceCursor(**start.cursors[source_reader.source.name]))
            mixture = self._mixture(start.phase)
            mixture.load_state_dict(start.mixture)
            progress = Progress(
                start.index, DataStats.from_state_dict(start.filled), list(start.exhausted), start.phase
            )
            emitted, delivered = DataStats.from_state_dict(state["emitted"]), state["delivered"]
        while True:
            start = WindowStart(
                progress.index,
                {r.source.name: asdict(r.cursor) for r in readers},
                mixture.state_dict(),
                progress.filled.state_dict(),
                list(progress.exhausted),
                progress.phase,
            )
            samples = self._fill(readers, mixture, progress, skipped, emitted)
            if not samples:  # the sources are done; an empty pack carries the last counts to the loader
                yield Pack([], [], reader, progress.filled.merge(emitted), skipped)
                return
            packs = plan_packs(
                [len(s) for s in samples],
                [s.num_images for s in samples],
                [s.num_views for s in samples],
                self.cfg.packing,
            )
            order = np.random.default_rng([self.cfg.seed, reader, progress.index]).permutation(len(packs))
            for number, p in enumerate(order):
                if number < delivered:
                    continue  # emitted before the checkpoint this worker resumed from
                keys, pack = self._render([samples[i] for i in packs[p]], emitted, skipped)
                self._state = {
                    "reader": reader,
                    "window": asdict(start),
                    "emitted": emitted.state_dict(),
                    "delivered": number + 1,
                }
                if pack:
                    yield Pack(pack, keys, reader, progress.filled.merge(emitted), skipped)
                    skipped = []
            delivered = 0
            progress.index += 1
            if self.phase > progress.phase:  # the next window draws in the new phase, its shares from zero
                progress.phase, mixture = self.phase, self._mixture(self.phase)

    def _mixture(self, phase: int) -> TokenMixture:
        weights = self.phase_weights[phase]
        return TokenMixture([s.name for s in self.cfg.sources], [weights[s.name] for s in self.cfg.sources])

    def _fill(
        self,
        readers: list[SourceReader],
        mixture: TokenMixture,
        progress: Progress,
        skipped: list[SkipRecord],
        emitted: DataStats,
    ) -> list[EncodedSample]:
        """Draws samples in mixture order until they hold `packing.window` packs' worth of tokens; skips
        are counted in progress.filled and appended to `skipped`."""
        by_name = {r.source.name: r for r in readers}
        samples: list[EncodedSample] = []
        budget, tokens = self.cfg.packing.window * self.cfg.packing.seq_len, 0
        while tokens < budget:
            active = [name for name in by_name if name not in progress.exhausted and mixture.targets[name] > 0]
            if not active:
                break
            name = mixture.pick(active)
            source_reader = by_name[name]
            epoch = source_reader.cursor.epoch
            item = source_reader.next()
            if item is None:
                progress.exhausted.append(name)
                continue
            try:
                if isinstance(item, SkippedSample):
                    raise item
                encoded = self.encoder.encode(item, name)
            except SkippedSample as skip:
                progress.filled.skips[skip.reason] += 1
                skipped.append(skip.record(name))
                if source_reader.cursor.epoch > epoch and not (mixture.tokens[name] or emitted.source_tokens[name]):
                    logger.error("source %s gave no usable sample in a whole pass; dropping it", name)
                    progress.exhausted.append(name)
                continue
            mixture.add(name, len(encoded))
            progress.filled.truncated += encoded.truncated
            samples.append(encoded)
            tokens += len(encoded)
        return samples

    def _render(
        self, pack: list[EncodedSample], emitted: DataStats, skipped: list[SkipRecord]
    ) -> tuple[list[str], list[ProcessedSample]]:
        keys, rendered = [], []
        for sample in pack:
            try:
                processed = self.encoder.render(sample)
            except SkippedSample as skip:
                emitted.skips[skip.reason] += 1
                skipped.append(skip.record(sample.source))
                continue
            keys.append(sample.key)
            rendered.append(processed)
            emitted.samples += 1
            emitted.tokens += len(sample)
            emitted.loss_tokens += sum(sample.layout.loss_mask[1:])
            emitted.images += sample.num_images
            emitted.views += sample.num_views
            emitted.text_tokens += len(sample) if not sample.num_images else 0
            emitted.source_tokens[sample.source] += len(sample)
        if rendered:
            emitted.packs += 1
            emitted.slots += self.cfg.packing.seq_len
        return keys, rendered
