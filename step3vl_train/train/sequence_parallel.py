"""Ulysses sequence parallelism (DeepSpeed's ALST): `trainer.sequence_parallel` consecutive ranks share
each packed row, each holding one contiguous slice of it through the decoder; around attention,
DeepSpeed's all-to-all trades the slices for whole rows of a share of the heads.

What is ours: the model slices the row itself (step3vl_train/model/sequence.py) after embedding its
images, so each rank runs the vision tower only on the views its slice needs; a group's micro-batches
are read and decoded once, by its first rank, which hands each rank the views its slice needs
(`GroupLoader`); counts are taken once per group. The kernel inside must find the packed samples in the
gathered position ids (compute.resolve_attention).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace

import torch.distributed as dist
from deepspeed.runtime.sequence_parallel import parallel_state_sp
from deepspeed.runtime.sequence_parallel.ulysses_sp import UlyssesSPAttentionHF

from step3vl_train.data.loader import PackedLoader
from step3vl_train.data.packing import PackedBatch
from step3vl_train.data.stats import DataStats
from step3vl_train.model.sequence import local_sequence
from step3vl_train.model.view_selection import ViewSelection
from step3vl_train.processing.processor import Batch


@dataclass(frozen=True)
class DataParallelRank:
    """This rank's place among the ranks that read different data."""

    rank: int
    world: int
    counts: bool  # the first rank of its sequence-parallel group: the one whose tokens and samples count


def data_parallel_rank(sequence_parallel: int) -> DataParallelRank:
    rank, world = dist.get_rank(), dist.get_world_size()
    if world % sequence_parallel:
        raise ValueError(f"trainer.sequence_parallel={sequence_parallel} must divide the number of ranks ({world})")
    return DataParallelRank(rank // sequence_parallel, world // sequence_parallel, rank % sequence_parallel == 0)


def init_sequence_parallel(model, size: int, kernel: str):
    """Wraps `kernel` in Ulysses attention and builds the sequence- and data-parallel groups; returns the
    groups object DeepSpeed takes as `mpu`, or None for size 1. Generation (predictions) runs in eval
    mode, where the wrapper steps aside and every rank attends over its whole row."""
    if size == 1:
        return None
    data_parallel_rank(size)  # the divisibility check, before DeepSpeed's own assertion
    if parallel_state_sp._SEQUENCE_PARALLEL_GROUP is not None:
        # A second model of the process (RL's critic beside the policy): DeepSpeed keeps one set of groups a
        # process, and has wrapped the kernel for every model already; wrapping it again would nest Ulysses.
        if parallel_state_sp.get_sequence_parallel_world_size() != size:
            raise ValueError("every model of a process must have the same sequence_parallel")
        return parallel_state_sp
    return UlyssesSPAttentionHF.register_with_transformers(
        model_name_or_path=model,
        core_attn_implementation=kernel,
        sequence_parallel_size=size,
        micro_batch_size=1,  # rows reach the decoder flattened into one
        seq_length_is_variable=True,
        disable_in_eval=True,
    )


def slice_views(batch: Batch, rank: int, size: int, image_token_id: int, tokens_per_view: Callable) -> Batch:
    """`batch` with only the views whose image tokens fall in slice `rank` of `size` of its rows (the
    slice the model takes: model/sequence.py), the rows themselves whole."""
    if batch.pixels is None:
        return batch
    local = local_sequence(batch.input_ids, None, batch.position_ids, None, image_token_id, shard=(rank, size))
    spec, num_patches = batch.pixels.spec, batch.num_patches
    selection = ViewSelection.of_views(
        len(num_patches),
        sum(num_patches),
        tokens_per_view(spec.image_size),
        tokens_per_view(spec.crop_size),
        num_patches,
        (local.image_tokens_before, local.image_tokens_before + local.image_tokens),
    )
    return replace(batch, pixels=batch.pixels.select(selection.globals, selection.crops))


class GroupLoader:
    """The micro-batches of a sequence-parallel group, read and decoded once a group: the group's first
    rank runs the loader (`loader`, None on the others; its workers have the group's CPUs) and hands each
    rank of the group the rows, whole, with only the views its slice needs (`slice_views`): one scatter of
    objects within the group a micro-batch, and None to each once the data has run out. The loader's
    state, statistics and skips are the first rank's alone, as counts are (`DataParallelRank.counts`)."""

    def __init__(
        self,
        loader: PackedLoader | None,
        group: dist.ProcessGroup,
        image_token_id: int,
        tokens_per_view: Callable[[int], int],
    ):
        self.loader, self.group = loader, group
        self.image_token_id, self.tokens_per_view = image_token_id, tokens_per_view
        self.size = dist.get_world_size(group)
        self._phase = 0  # the phase where this rank holds no loader

    def __iter__(self) -> Iterator[PackedBatch]:
        source = iter(self.loader) if self.loader is not None else None
        while True:
            parts = None
            if source is not None:
                packed = next(source, None)
                parts = self._split(packed) if packed is not None else [None] * self.size
            received = [None]
            dist.scatter_object_list(received, parts, group=self.group, group_src=0)
            if received[0] is None:
                return
            yield received[0]

    def _split(self, packed: PackedBatch) -> list[PackedBatch]:
        """Each rank's micro-batch; the loader's statistics and skips stay with this (the first) rank."""
        parts = []
        for rank in range(self.size):
            batch = slice_views(packed.batch, rank, self.size, self.image_token_id, self.tokens_per_view)
            counted = {} if rank == 0 else {"stats": DataStats(), "skipped": []}
            parts.append(replace(packed, batch=batch, **counted))
        return parts

    @property
    def phase(self) -> int:
        return self.loader.phase if self.loader is not None else self._phase

    def enter_phase(self, phase: int) -> None:
        if self.loader is not None:
            self.loader.enter_phase(phase)
        self._phase = phase

    def stats(self) -> DataStats:
        return self.loader.stats() if self.loader is not None else DataStats()

    def skipped_keys(self) -> dict[str, str]:
        return self.loader.skipped_keys() if self.loader is not None else {}

    def state_dict(self) -> dict:
        return self.loader.state_dict() if self.loader is not None else {}

    def load_state_dict(self, state: dict) -> None:
        if self.loader is not None:
            self.loader.load_state_dict(state)
