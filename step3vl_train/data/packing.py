"""Packing samples into fixed-length sequences, and collating packs into a `Batch`.

Inside a pack each sample keeps its own position ids (0, 1, ...), which is how the model tells samples
apart: transformers turns restarting position ids (with no attention mask) into a block-diagonal causal
mask, so packed samples never attend to each other. The first token of each sample is never a target,
so no sample learns to predict its neighbour.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import torch

from step3vl_train.data.config import PackingConfig
from step3vl_train.data.skips import SkipRecord
from step3vl_train.data.stats import DataStats
from step3vl_train.processing.pixels import PixelViews
from step3vl_train.processing.processor import IGNORE_INDEX, Batch, ProcessedSample


@dataclass
class Pack:
    """One sequence of whole samples, as a worker hands it over."""

    samples: list[ProcessedSample]
    keys: list[str]  # the samples' keys, in the same order
    worker: int  # global reader index of the worker that made it
    stats: DataStats  # that worker's running totals, this pack included
    skipped: list[SkipRecord] = field(default_factory=list)  # skips the worker met since its previous pack

    def __len__(self) -> int:
        return sum(len(sample.input_ids) for sample in self.samples)


@dataclass
class PackedBatch:
    batch: Batch | None  # None only inside the loader, for a batch of empty packs
    keys: list[list[str]]  # per row, the keys of the samples packed into it
    worker: int
    stats: DataStats
    skipped: list[SkipRecord]  # its packs' skips, in order

    def pin_memory(self) -> PackedBatch:
        """A copy whose batch is in page-locked memory: `StatefulDataLoader(pin_memory=True)` calls this."""
        return replace(self, batch=self.batch.pin_memory() if self.batch is not None else None)


def plan_packs(
    lengths: Sequence[int], images: Sequence[int], views: Sequence[int], cfg: PackingConfig
) -> list[list[int]]:
    """Best-fit decreasing: longest samples first, each into the open pack it fills most tightly within
    the token, image and ViT-view budgets. Returns sample indices per pack, in input order within a pack."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    packs: list[list[int]] = []
    room: list[list[int]] = []  # tokens, images, views left in each pack
    for i in order:
        need = (lengths[i], images[i], views[i])
        fits = [p for p, left in enumerate(room) if all(n <= r for n, r in zip(need, left, strict=True))]
        if fits:
            p = min(fits, key=lambda p: (room[p][0], p))
        else:
            packs.append([])
            room.append([cfg.seq_len, cfg.max_images_per_pack, cfg.max_views_per_pack])
            p = len(packs) - 1
        packs[p].append(i)
        room[p] = [r - n for r, n in zip(room[p], need, strict=True)]
    return [sorted(pack) for pack in packs]


def collate_packs(packs: Sequence[Pack], pad_token_id: int) -> PackedBatch:
    """(B, L) rows, one pack each, padded on the right to the longest; padding is its own segment
    (positions from 0, no targets). Images are concatenated in pack order, then sample order.
    Empty packs (a finished worker's last counts) make no row; `batch` is None if no pack has samples."""
    # A DataLoader batch is made inside one worker, so all its packs share a worker and the last pack's
    # totals cover the others.
    worker, stats = packs[-1].worker, packs[-1].stats
    skipped = [skip for pack in packs for skip in pack.skipped]
    packs = [pack for pack in packs if pack.samples]
    if not packs:
        return PackedBatch(None, [], worker, stats, skipped)
    length = max(len(pack) for pack in packs)
    input_ids = torch.full((len(packs), length), pad_token_id, dtype=torch.long)
    labels = torch.full((len(packs), length), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(packs), length), dtype=torch.long)
    position_ids = torch.zeros((len(packs), length), dtype=torch.long)
    for row, pack in enumerate(packs):
        at = 0
        for sample in pack.samples:
            n = len(sample.input_ids)
            input_ids[row, at : at + n] = sample.input_ids
            labels[row, at : at + n] = sample.labels
            labels[row, at] = IGNORE_INDEX
            position_ids[row, at : at + n] = torch.arange(n)
            at += n
        attention_mask[row, :at] = 1
        position_ids[row, at:] = torch.arange(length - at)
    samples = [sample for pack in packs for sample in pack.samples]
    # Inside a worker, PixelViews.cat writes all the batch's pixels into one shared-memory buffer.
    pixels = [s.pixels for s in samples if s.pixels is not None]
    batch = Batch(
        input_ids=input_ids,
        attention_mask=attention_mask,
        labels=labels,
        pixels=PixelViews.cat(pixels) if pixels else None,
        num_patches=[n for s in samples for n in s.num_patches],
        position_ids=position_ids,
    )
    return PackedBatch(batch, [pack.keys for pack in packs], worker, stats, skipped)
