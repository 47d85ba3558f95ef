"""Data configuration: the dataclasses behind `configs/data/*.yaml` and the `data:` block of recipes."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from omegaconf import OmegaConf

SOURCE_KINDS = ("webdataset", "jsonl", "hf")
OVERFLOW_POLICIES = ("truncate", "skip")


@dataclass
class SourceConfig:
    name: str
    paths: list[str]  # webdataset: shard paths, globs, brace ranges, pipe:/http URLs; jsonl: files; hf: one dir
    kind: str = "webdataset"
    weight: float = 1.0  # share of the mixture's tokens, before normalisation over the sources
    image_dir: str | None = None  # jsonl: where its `images` entries are found; default: beside the file
    split: str = "train"  # hf: the split of a saved DatasetDict


def train_source(pattern: str) -> SourceConfig:
    """The `train` shortcut's one source: webdataset shards, or JSONL files (images beside them)."""
    kind = "jsonl" if pattern.endswith(".jsonl") else "webdataset"
    return SourceConfig(name="train", paths=[pattern], kind=kind)


def check_sources(group: str, sources: list[SourceConfig], weighted: bool = True) -> None:
    """`data.<group>`'s sources: distinct names, known kinds, paths, and positive weights where they weigh."""
    names = [source.name for source in sources]
    if len(set(names)) != len(names):
        raise ValueError(f"data.{group} has repeated names: {names}")
    for source in sources:
        if source.kind not in SOURCE_KINDS:
            raise ValueError(f"data.{group}.{source.name}.kind must be one of {SOURCE_KINDS}, not {source.kind!r}")
        if not source.paths:
            raise ValueError(f"data.{group}.{source.name}.paths is empty")
        if weighted and source.weight <= 0:
            raise ValueError(f"data.{group}.{source.name}.weight must be positive, not {source.weight}")


@dataclass
class PackingConfig:
    seq_len: int = 4096  # tokens per packed sequence
    overflow: str = "truncate"  # a sample longer than seq_len: truncate (never inside an image) or skip
    max_images_per_pack: int = 64
    max_views_per_pack: int = 256  # ViT inputs per pack (global views + crops): bounds the ViT batch
    # Packs' worth of tokens gathered before packing them: more packs tighter (the window's last pack is
    # the one left part-full) and costs memory (encoded samples wait for their pack) and resume work.
    window: int = 32


@dataclass
class DataConfig:
    sources: list[SourceConfig] = field(default_factory=list)
    packing: PackingConfig = field(default_factory=PackingConfig)
    root: str | None = None  # relative source paths are read under this directory
    micro_batch_size: int = 1  # packed sequences per rank per micro-step
    # DataLoader worker processes per rank, or "auto" (`loader_workers`): the CPUs a rank has, less its own.
    num_workers: Any = "auto"
    prefetch_factor: int = 2  # micro-batches each worker keeps ready
    seed: int = 0
    max_epochs: int | None = None  # passes over each source; None repeats them forever
    # A shortcut: webdataset shards (paths, globs, brace ranges), or `.jsonl` files, read as the only
    # source in place of the recipe's mixture; e.g. data.train='/data/mine/shard-{000000..000099}.tar'.
    train: str | None = None
    # Validation sets (train/validation.py), read under `root` like `sources`; their `weight` is unused.
    eval: list[SourceConfig] = field(default_factory=list)
    eval_max_samples: int | None = None  # the first this many samples of each eval source; None: all of it

    def __post_init__(self) -> None:
        if self.train:
            self.sources = [train_source(self.train)]
        if not self.sources:
            raise ValueError("data.sources is empty")
        check_sources("sources", self.sources)
        check_sources("eval", self.eval, weighted=False)
        if self.eval_max_samples is not None and self.eval_max_samples < 1:
            raise ValueError(f"data.eval_max_samples must be at least 1 (or null: all), not {self.eval_max_samples}")
        if self.num_workers != "auto" and not (isinstance(self.num_workers, int) and self.num_workers >= 0):
            raise ValueError(f"data.num_workers must be a count >= 0 or auto, not {self.num_workers!r}")
        if self.packing.overflow not in OVERFLOW_POLICIES:
            raise ValueError(f"data.packing.overflow must be one of {OVERFLOW_POLICIES}, not {self.packing.overflow!r}")

    @classmethod
    def from_dict(cls, values: Any) -> DataConfig:
        """From a mapping or DictConfig; unknown keys and missing required ones are errors naming them."""
        merged = OmegaConf.merge(OmegaConf.structured(cls), values)
        return OmegaConf.to_object(merged)


# "auto" workers at most: a micro-step takes one pack, so more workers than it takes to make one within
# a micro-step's compute only add packs waiting in shared memory (launch/estimate_memory.py counts them).
AUTO_WORKERS_CAP = 8


def loader_workers(setting: int | str, cpu_share: int = 1) -> int:
    """`data.num_workers` as a count. "auto": the CPUs this process may run on, split between its node's
    ranks (torchrun's LOCAL_WORLD_SIZE), less one a rank for its own process; `cpu_share` ranks' worth
    for a loader that reads for several ranks (a sequence-parallel group's first rank); at least one and
    at most AUTO_WORKERS_CAP."""
    if setting != "auto":
        return setting
    per_rank = len(os.sched_getaffinity(0)) // int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return max(1, min(cpu_share * (per_rank - 1), AUTO_WORKERS_CAP))
