"""Ulysses sequence parallelism (DeepSpeed's ALST): `trainer.sequence_parallel` consecutive ranks share
each packed row, each holding one contiguous slice of it through the decoder; around attention,
DeepSpeed's all-to-all trades the slices for whole rows of a share of the heads.

What is ours: the model slices the row itself (step3vl_train/model/sequence.py) after embedding its
images, so each rank runs the vision tower only on the views its slice needs; the data loader is built
over the data-parallel ranks (a sequence-parallel group reads one stream); counts are taken once per
group. The kernel inside must find the packed samples in the gathered position ids
(compute.resolve_attention).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.distributed as dist
from deepspeed.runtime.sequence_parallel.ulysses_sp import UlyssesSPAttentionHF


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
    return UlyssesSPAttentionHF.register_with_transformers(
        model_name_or_path=model,
        core_attn_implementation=kernel,
        sequence_parallel_size=size,
        micro_batch_size=1,  # rows reach the decoder flattened into one
        seq_length_is_variable=True,
        disable_in_eval=True,
    )
