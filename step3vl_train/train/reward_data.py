"""Preference pairs for reward-model training: the `data:` block of configs/train_rm.yaml and the reader.

A pair is a sample of the data schema (docs/data.md) with `messages` ending with a user turn, its images
beside it, and `chosen` and `rejected` replies. Each rank reads its own slice of every source (the
readers of step3vl_train/data/sources.py, rank r of world w), mixed by pair counts. Pairs are not
packed: a micro-batch is P pairs as 2P right-padded rows. The reader's state (each source's cursor, the
mixture's counts, the skips) is part of the trainer's checkpoint, so a resumed run neither repeats nor
skips a pair. A pair that cannot be used is skipped and counted by reason, as every sample is.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field

from step3vl_train.data.config import SourceConfig, check_sources, train_source
from step3vl_train.data.mixed import MixedSamples
from step3vl_train.data.schema import Sample
from step3vl_train.data.skips import SkippedSample
from step3vl_train.data.stats import DataStats
from step3vl_train.processing.images import ImageError, load_image
from step3vl_train.processing.placeholders import PlaceholderMismatchError
from step3vl_train.processing.processor import Step3VLProcessor
from step3vl_train.train.reward_model import Pair, PairBatch, pair_batch, reward_conversation


@dataclass
class PairDataConfig:
    sources: list[SourceConfig] = field(default_factory=list)  # `weight` counts pairs here, not tokens
    eval: list[SourceConfig] = field(default_factory=list)  # held-out pairs, read once from the start each time
    root: str | None = None  # relative source paths (training and held-out) are read under this directory
    train: str | None = None  # a shortcut: these shards (paths, globs, braces) are the only training source
    micro_batch_size: int = 4  # pairs per rank per micro-step: twice as many rows
    max_tokens: int = 4096  # a pair whose chosen or rejected row is longer is skipped (too_long)
    seed: int = 0
    max_epochs: int | None = None  # passes over the training sources; None repeats them forever

    def __post_init__(self) -> None:
        if self.train:
            self.sources = [train_source(self.train)]
        if not self.sources:
            raise ValueError("data.sources is empty")
        check_sources("sources", self.sources)
        check_sources("eval", self.eval, weighted=False)
        if self.micro_batch_size < 1 or self.max_tokens < 1:
            raise ValueError("data.micro_batch_size and data.max_tokens must be at least 1")


class PairLoader:
    """One rank's pairs, `micro_batch_size` at a time: the training sources forever (or `max_epochs`
    passes), or with `held_out` the eval sources once."""

    def __init__(
        self,
        cfg: PairDataConfig,
        processor: Step3VLProcessor,
        rank: int = 0,
        world_size: int = 1,
        held_out: bool = False,
    ):
        self.cfg = cfg
        self.processor = processor
        self.rank, self.world_size = rank, world_size
        pad = processor.tokenizer.pad_token_id
        self.pad_token_id = pad if pad is not None else 0
        sources = cfg.eval if held_out else cfg.sources
        max_epochs = 1 if held_out else cfg.max_epochs
        self.samples = MixedSamples(sources, cfg.root, rank, world_size, cfg.seed, max_epochs)

    def rewind(self) -> None:
        """Back to the start of every source, counts cleared; the keys already logged as bad stay known."""
        self.samples.rewind()

    def __iter__(self) -> Iterator[PairBatch]:
        """Micro-batches until the sources end; the last may hold fewer pairs."""
        while True:
            pairs = self.samples.take(self.cfg.micro_batch_size, self.prepare, "pair")
            if not pairs:
                self.samples.skip_log.flush()
                return
            yield pair_batch(pairs, self.pad_token_id)

    def prepare(self, sample: Sample, source: str) -> Pair:
        """The pair's two rows (`source` names where it came from); raises SkippedSample naming what makes
        it unusable."""
        if sample.messages is None or sample.messages[-1]["role"] != "user":
            raise SkippedSample("bad_schema", sample.key, "a preference pair needs `messages` ending with a user turn")
        if not all(isinstance(reply, str) and reply for reply in (sample.chosen, sample.rejected)):
            raise SkippedSample("bad_schema", sample.key, "a preference pair needs `chosen` and `rejected` strings")
        try:
            images = [load_image(data, sample.key) for data in sample.images]
        except ImageError as error:
            raise SkippedSample("corrupt_image", sample.key, str(error)) from error
        rows = []
        for reply in (sample.chosen, sample.rejected):
            conversation = reward_conversation(sample.messages, reply)
            try:
                rows.append(self.processor(conversation, images, add_generation_prompt=False, sample=sample.key))
            except PlaceholderMismatchError as error:
                raise SkippedSample("placeholder_mismatch", sample.key, str(error)) from error
        longest = max(len(row.input_ids) for row in rows)
        if longest > self.cfg.max_tokens:
            raise SkippedSample("too_long", sample.key, f"{longest} > data.max_tokens={self.cfg.max_tokens} tokens")
        return Pair(sample.key, *rows)

    def stats(self) -> DataStats:
        """Pairs handed out (`samples`) and skips, as the trainer reads a loader's."""
        samples = self.samples
        return DataStats(samples=samples.taken, skips=Counter(samples.skips), skipped_unique=samples.skip_log.unique())

    def skipped_keys(self) -> dict[str, str]:
        return dict(self.samples.skip_log.seen)

    def state_dict(self) -> dict:
        return {"topology": {"rank": self.rank, "world_size": self.world_size}, **self.samples.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        topology = {"rank": self.rank, "world_size": self.world_size}
        if state["topology"] != topology:
            raise ValueError(f"cannot resume the pair reader of {state['topology']} as {topology}")
        self.samples.load_state_dict(state, "pair")
