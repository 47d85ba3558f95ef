"""Validation in pre-training and SFT: the loss over a fixed set of held-out samples (`data.eval`), overall
and per source, every `trainer.eval_every` steps and at the run's last.

The set is the first `data.eval_max_samples` samples of each eval source (all of them with none), in an
order fixed by EVAL_SEED rather than data.seed, so it is the same set in every run and at any number of
ranks. Each validation reads it afresh with readers of its own: the training loader is never touched.
Sample i of a source goes to rank i % world; every rank reads the source's records, and lays out, packs
(data.packing) and runs only its own. A micro-batch holds one source's rows, so each forward's loss
belongs to one source.

Rank roles: in eval mode every rank runs whole rows (sequence parallelism is for training:
model/step3vl.py), so the set is split over all ranks, those of a sequence-parallel group included. Every
forward is collective under ZeRO-3 (it gathers the decoder's weights, and the model agrees over the world
on whether the tower runs), so a rank whose rows have run out runs a one-token stand-in with no targets until
every rank's have.
"""

from __future__ import annotations

import itertools
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist

from step3vl_train.data.config import DataConfig, SourceConfig
from step3vl_train.data.encoding import EncodedSample, SampleEncoder
from step3vl_train.data.packing import Pack, collate_packs, plan_packs
from step3vl_train.data.skips import SkipLog, SkippedSample
from step3vl_train.data.sources import SourceReader, resolve_shards
from step3vl_train.data.stats import DataStats
from step3vl_train.processing.processor import IGNORE_INDEX, Batch, ProcessedSample, Step3VLProcessor
from step3vl_train.train.distributed import until_every_rank_is_done
from step3vl_train.usage import UsageError

EVAL_SEED = 0  # orders each eval source's shards: a new data.seed reorders training, not the validation set
SUMS = ("loss", "tokens", "samples", "skipped")  # what a validation adds up per source, in this order


@dataclass
class SourceBatch:
    """A micro-batch of one eval source's packed rows."""

    source: int  # its index in data.eval
    batch: Batch
    keys: list[list[str]]  # per row, the keys of the samples packed into it


def eval_shards(source: SourceConfig, root: str | None) -> list[str]:
    try:
        return resolve_shards(source, root)
    except FileNotFoundError as error:
        raise UsageError(
            f"data.eval.{source.name}: {source.paths} (under data.root={root}) matches no file: write the "
            "held-out set there, or run without validation (data.eval=[])"
        ) from error


class ValidationSet:
    """One rank's share of the validation set, in micro-batches, read afresh by each iteration; `counts`
    holds the last iteration's samples and skips per source."""

    def __init__(self, cfg: DataConfig, processor: Step3VLProcessor, rank: int, world: int):
        self.sources = cfg.eval
        self.shards = [eval_shards(source, cfg.root) for source in cfg.eval]
        self.cfg, self.rank, self.world = cfg, rank, world
        self.encoder = SampleEncoder(processor, cfg.packing)
        pad = processor.tokenizer.pad_token_id
        self.pad_token_id = pad if pad is not None else 0
        self.skip_log = SkipLog()  # each bad key logged once a run, however many validations meet it
        self.counts: list[Counter[str]] = []

    def __iter__(self) -> Iterator[SourceBatch]:
        self.counts = [Counter() for _ in self.sources]
        for index in range(len(self.sources)):
            rows: list[Pack] = []
            for window in self._windows(index):
                for pack in self._packs(index, window):
                    rows.append(pack)
                    if len(rows) == self.cfg.micro_batch_size:
                        yield self._batch(index, rows)
                        rows = []
            if rows:
                yield self._batch(index, rows)
        self.skip_log.flush()

    def _windows(self, index: int) -> Iterator[list[EncodedSample]]:
        """This rank's samples of source `index`, laid out, in lists of `packing.window` packs' worth of
        tokens (the last may hold fewer): packs are planned a window at a time, as in training."""
        budget = self.cfg.packing.window * self.cfg.packing.seq_len
        window, tokens = [], 0
        for sample in self._samples(index):
            window.append(sample)
            tokens += len(sample)
            if tokens >= budget:
                yield window
                window, tokens = [], 0
        if window:
            yield window

    def _samples(self, index: int) -> Iterator[EncodedSample]:
        source, cap = self.sources[index], self.cfg.eval_max_samples
        reader = SourceReader(source, self.shards[index], 0, 1, EVAL_SEED, max_epochs=1)
        for position in itertools.count() if cap is None else range(cap):
            item = reader.next()
            if item is None:
                return
            if position % self.world != self.rank:
                continue
            try:
                if isinstance(item, SkippedSample):
                    raise item
                encoded = self.encoder.encode(item, source.name)
            except SkippedSample as skip:
                self._skipped(index, skip)
                continue
            yield encoded

    def _packs(self, index: int, window: list[EncodedSample]) -> Iterator[Pack]:
        """The window's packs, their images decoded only as each is reached."""
        plans = plan_packs(
            [len(s) for s in window], [s.num_images for s in window], [s.num_views for s in window], self.cfg.packing
        )
        for plan in plans:
            keys, rendered = [], []
            for sample in (window[i] for i in plan):
                try:
                    rendered.append(self.encoder.render(sample))
                except SkippedSample as skip:
                    self._skipped(index, skip)
                    continue
                keys.append(sample.key)
            self.counts[index]["samples"] += len(rendered)
            if rendered:
                yield Pack(rendered, keys, self.rank, DataStats())

    def _batch(self, index: int, rows: list[Pack]) -> SourceBatch:
        packed = collate_packs(rows, self.pad_token_id)
        return SourceBatch(index, packed.batch, packed.keys)

    def _skipped(self, index: int, skip: SkippedSample) -> None:
        self.counts[index]["skipped"] += 1
        self.skip_log.record(skip.record(f"eval {self.sources[index].name}"))


def stand_in_batch(pad_token_id: int) -> Batch:
    """One packed row of one token with no target: the forward a rank makes once its rows have run out."""
    token = torch.tensor([pad_token_id])
    row = ProcessedSample(token, torch.tensor([IGNORE_INDEX]), None, [], torch.zeros(0, dtype=torch.bool))
    return collate_packs([Pack([row], ["stand-in"], 0, DataStats())], pad_token_id).batch


def evaluate(engine, batches: Iterable[SourceBatch], stand_in: Batch, num_sources: int) -> torch.Tensor:
    """Each source's summed token loss (nats) and supervised tokens over all ranks, as a (num_sources, 2)
    float64 tensor on the engine's device. Every rank makes as many forwards as the rank with the most
    batches, the rest on `stand_in`, whose loss is not counted. Call under torch.no_grad."""
    device = engine.device
    sums = torch.zeros(num_sources, 2, dtype=torch.float64, device=device)
    for item in until_every_rank_is_done(batches, device):
        batch = item.batch if item is not None else stand_in
        inputs = batch.model_inputs(device=device, pixel_dtype=engine.module.dtype)
        loss_sum = engine(**inputs, num_items_in_batch=1).loss  # divided by 1: the sum over the targets
        if item is not None:
            targets = int((batch.labels[:, 1:] != IGNORE_INDEX).sum())  # the loss is shifted by one
            sums[item.source] += torch.stack([loss_sum.detach().double(), loss_sum.new_tensor(targets).double()])
    dist.all_reduce(sums)
    return sums


def figures(names: list[str], sums: list[list[float]]) -> dict:
    """The metrics row's `eval/*` figures from each source's SUMS: the loss per supervised token over the
    whole set and per source (None where a source gave no target), tokens, samples and skipped samples."""
    totals = dict(zip(SUMS, map(sum, zip(*sums, strict=True)), strict=True))
    row = {"eval/loss": totals["loss"] / totals["tokens"] if totals["tokens"] else None}
    for name, (loss, tokens, *_) in zip(names, sums, strict=True):
        row[f"eval/loss/{name}"] = loss / tokens if tokens else None
    return row | {f"eval/{key}": int(totals[key]) for key in ("tokens", "samples", "skipped")}


def summary(row: dict) -> str:
    """One line of `figures`' row: `loss 5.1234 (text 4.9876, caption 5.4321), 1,234 tokens, 1 skipped`."""
    losses = {key.removeprefix("eval/loss/"): loss for key, loss in row.items() if key.startswith("eval/loss/")}
    parts = ", ".join(f"{name} {loss:.4f}" if loss is not None else f"{name} -" for name, loss in losses.items())
    overall = f"{row['eval/loss']:.4f}" if row["eval/loss"] is not None else "-"
    skipped = f", {row['eval/skipped']} skipped" if row["eval/skipped"] else ""
    return f"loss {overall} ({parts}), {row['eval/tokens']:,} tokens{skipped}"


class Validation:
    """The trainer's validation: when one is due, and its figures."""

    def __init__(self, cfg: DataConfig, processor: Step3VLProcessor, eval_every: int):
        self.set = ValidationSet(cfg, processor, dist.get_rank(), dist.get_world_size())
        self.eval_every = eval_every

    def due(self, step: int, final: bool) -> bool:
        """At every `eval_every`-th step and at the run's last; never with eval_every 0."""
        return self.eval_every > 0 and (final or step % self.eval_every == 0)

    def run(self, engine) -> dict:
        """The `eval/*` figures of the model as it is now, every rank taking part. The engine is in eval mode
        meanwhile and goes back to the mode it was in; the RNGs are left as they were."""
        was_training = engine.training
        devices = [engine.device] if engine.device.type == "cuda" else []
        engine.eval()
        try:
            with torch.random.fork_rng(devices=devices), torch.no_grad():
                sums = evaluate(engine, self.set, stand_in_batch(self.set.pad_token_id), len(self.set.sources))
        finally:
            engine.train(was_training)
        counts = torch.tensor(
            [[counts["samples"], counts["skipped"]] for counts in self.set.counts], dtype=torch.float64
        ).to(engine.device)
        dist.all_reduce(counts)
        return figures([source.name for source in self.set.sources], torch.cat([sums, counts], dim=1).tolist())
