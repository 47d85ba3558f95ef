"""The part of a (B, L) batch that this rank's decoder runs on.

Two things can change the layout the loader made:
- varlen kernels (flash-attention) and sequence parallelism take packed rows as one flattened row,
  (B, L) -> (1, B * L). Nothing crosses a row boundary: each row starts a sample at position 0, and a
  sample's first token is never a target.
- sequence parallelism (Ulysses) gives each of the `size` ranks sharing a row one contiguous slice of it,
  after padding it to a multiple of `size` with a padding sample (positions from 0, no targets).
Targets are shifted before any of this (position t predicts targets[t]), so a slice holds its own.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F

IGNORE_INDEX = -100


@dataclass
class LocalSequence:
    input_ids: torch.Tensor  # (b, l)
    attention_mask: torch.Tensor | None  # (b, l) for padded rows, None for packed ones
    position_ids: torch.Tensor | None  # (b, l)
    targets: torch.Tensor | None  # (b, l): the token position t predicts, IGNORE_INDEX where none
    image_tokens_before: int  # <im_patch> tokens of the batch before this slice, in row-major order
    image_tokens: int  # <im_patch> tokens inside it
    batch_shape: tuple[int, int]  # (B, L) of the batch it came from

    @property
    def is_whole(self) -> bool:
        """The whole batch, possibly flattened: outputs can be put back in (B, L) shape."""
        return self.input_ids.numel() == self.batch_shape[0] * self.batch_shape[1]

    def to_batch(self, values: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
        """Per-position values of this part (its shape) -> (B, L) of the whole batch: reshaped where this rank
        holds it all, else gathered over the sequence-parallel `group` (RL's log-probs and values: every rank
        of the group then computes the same losses from the whole rows)."""
        if self.is_whole:
            return values.reshape(self.batch_shape)
        rows, length = self.batch_shape
        return _GatherSlices.apply(values, group)[:, : rows * length].reshape(rows, length)


class _GatherSlices(torch.autograd.Function):
    """(1, l) slices of the sequence-parallel ranks -> (1, l x size), in rank order. Backward: the whole
    gradient summed over the group (each rank's loss read the whole), and this rank's slice of it."""

    @staticmethod
    def forward(ctx, values: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
        ctx.group = group
        parts = [torch.empty_like(values) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, values.contiguous(), group=group)
        return torch.cat(parts, dim=1)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        grad = grad.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(grad, group=ctx.group)
        size, rank = dist.get_world_size(ctx.group), dist.get_rank(ctx.group)
        part = grad.shape[1] // size
        return grad[:, rank * part : (rank + 1) * part], None


def shift_targets(labels: torch.Tensor) -> torch.Tensor:
    """(B, L) labels -> (B, L) targets: targets[:, t] = labels[:, t + 1], IGNORE_INDEX at the end."""
    return F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)


def local_sequence(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    position_ids: torch.Tensor | None,
    targets: torch.Tensor | None,
    image_token_id: int,
    flatten: bool = False,
    shard: tuple[int, int] = (0, 1),
) -> LocalSequence:
    """This rank's slice (`shard` = (rank, size) in the sequence-parallel group) of the batch, flattened
    when `flatten` or sharded. Only packed rows (position ids, no attention mask) can be flattened."""
    batch_shape = tuple(input_ids.shape)
    rank, size = shard
    packed = position_ids is not None and attention_mask is None
    if (flatten or size > 1) and packed:
        input_ids, position_ids = input_ids.reshape(1, -1), position_ids.reshape(1, -1)
        targets = targets.reshape(1, -1) if targets is not None else None
    elif size > 1:
        raise ValueError("sequence parallelism needs packed rows (position ids and no attention mask)")
    is_image = input_ids == image_token_id
    if size == 1:
        return LocalSequence(input_ids, attention_mask, position_ids, targets, 0, int(is_image.sum()), batch_shape)
    padding = -input_ids.shape[1] % size
    if padding:
        input_ids = F.pad(input_ids, (0, padding))
        position_ids = torch.cat([position_ids, torch.arange(padding, device=position_ids.device)[None]], dim=1)
        targets = F.pad(targets, (0, padding), value=IGNORE_INDEX) if targets is not None else None
        is_image = F.pad(is_image, (0, padding))
    part = input_ids.shape[1] // size
    window = slice(rank * part, (rank + 1) * part)
    before = int(is_image[:, : window.start].sum())
    return LocalSequence(
        input_ids[:, window],
        None,
        position_ids[:, window],
        targets[:, window] if targets is not None else None,
        before,
        int(is_image[:, window].sum()),
        batch_shape,
    )
