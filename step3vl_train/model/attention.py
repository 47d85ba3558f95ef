"""Kernels for packed rows whose samples are told apart by their position ids alone: `sdpa_packed` (the CPU
reference) and `flex_packed` (GPUs).

DeepSpeed's Ulysses wrapper hands the core kernel the whole row's position ids (gathered over the
sequence-parallel ranks) and drops the mask transformers built for the local shard, so the samples must be
found in the position ids. flash-attention's varlen path does that for samples that start at position 0.

These two also read a shared prompt from them (RL's `algo.shared_prompt`, rl/experience.py): a sample that
starts at position p > 0 continues the prompt of the last sample before it that started at 0, and sees that
sample's first p tokens as well as its own earlier ones. A group's responses are laid out that way, the prompt
once and each response after it, every response attending to the prompt and to itself. flash-attention has no
such mask; flex attention takes it as a block mask, whose fully masked blocks it skips, so a response row
costs what its own tokens and the prompt's cost.

`sdpa_packed` runs each sample apart (a Python loop over them: the CPU's reference, refused on GPUs by
compute.resolve_attention); `flex_packed` builds a block mask from the same rule, once a forward.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention
from transformers import AttentionInterface
from transformers.integrations.flex_attention import compile_friendly_flex_attention


@dataclass
class PackedLayout:
    """Per token of (B, L) packed rows: its sample, and the keys [prefix_start, prefix_end) of an earlier
    sample that it sees as well (the shared prompt it continues; empty for a sample starting at 0)."""

    sample: torch.Tensor  # (B, L)
    prefix_start: torch.Tensor  # (B, L)
    prefix_end: torch.Tensor  # (B, L)

    @classmethod
    def of(cls, position_ids: torch.Tensor) -> PackedLayout:
        rows, length = position_ids.shape
        index = torch.arange(length, device=position_ids.device).expand(rows, length)
        first = torch.diff(position_ids, dim=-1, prepend=position_ids[:, :1]) != 1  # a row's first token too
        start = torch.where(first, index, 0).cummax(-1).values
        # The last sample at or before this one that starts at 0 (-1 where none): whose prompt a later one continues.
        anchor = torch.where(first & (position_ids == 0), index, -1).cummax(-1).values
        offset = position_ids.gather(1, start)  # the position the sample starts at
        prefix_end = torch.where(anchor >= 0, torch.minimum(anchor + offset, start), 0)
        return cls(first.cumsum(-1), anchor.clamp(min=0), prefix_end)

    @property
    def is_causal(self) -> bool:
        """One sample a row, starting at 0: the plain causal mask."""
        return bool((self.sample[:, -1] == self.sample[:, 0]).all() and (self.prefix_end == 0).all())

    def allows(self, b: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """Whether query q of row b sees key k (broadcasting index tensors; flex attention's mask_mod)."""
        own = (self.sample[b, q] == self.sample[b, k]) & (k <= q)
        prompt = (k >= self.prefix_start[b, q]) & (k < self.prefix_end[b, q])
        return own | prompt

    def block_mask(self) -> BlockMask:
        rows, length = self.sample.shape
        # Compiled, it evaluates the rule a block at a time; eager, it would build the (L x L) mask first.
        return create_block_mask(
            lambda b, h, q, k: self.allows(b, q, k), rows, None, length, length, device=self.sample.device,
            _compile=self.sample.is_cuda,
        )  # fmt: skip


def sdpa_packed_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    position_ids: torch.Tensor | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """query (B, heads, Lq, D), key and value (B, kv_heads, Lk, D) -> (B, Lq, heads, D).

    Rows are packed samples told apart by `position_ids` (B, Lq), as above: each sample attends over its
    own keys (and the prompt it continues) only, one call a sample, so that a row costs what its samples
    cost apart. A decode step over a KV cache (Lq < Lk, one unpadded row, as in generation) attends to
    every cached key."""
    attend = functools.partial(F.scaled_dot_product_attention, scale=scaling, dropout_p=dropout, enable_gqa=True)
    if query.shape[2] != key.shape[2]:
        if query.shape[0] != 1 or query.shape[2] != 1:
            raise ValueError("sdpa_packed decodes one unpadded row at a time")
        return attend(query, key, value).transpose(1, 2).contiguous(), None
    layout = PackedLayout.of(position_ids) if position_ids is not None else None
    if layout is None or layout.is_causal:
        return attend(query, key, value, is_causal=True).transpose(1, 2).contiguous(), None
    rows = []
    for row in range(query.shape[0]):
        q, k, v = query[row : row + 1], key[row : row + 1], value[row : row + 1]
        starts = torch.nonzero(torch.diff(layout.sample[row], prepend=layout.sample[row, :1] - 1)).flatten().tolist()
        pieces = []
        for start, end in zip(starts, [*starts[1:], query.shape[2]], strict=True):
            prompt = slice(int(layout.prefix_start[row, start]), int(layout.prefix_end[row, start]))
            own = slice(start, end)
            if prompt.start == prompt.stop:
                pieces.append(attend(q[:, :, own], k[:, :, own], v[:, :, own], is_causal=True))
                continue
            # the prompt's keys, then the sample's own, causal
            mask = torch.ones(end - start, end - start, dtype=torch.bool, device=q.device).tril()
            mask = torch.cat([mask.new_ones(end - start, prompt.stop - prompt.start), mask], dim=1)
            keys = torch.cat([k[:, :, prompt], k[:, :, own]], dim=2)
            pieces.append(attend(q[:, :, own], keys, torch.cat([v[:, :, prompt], v[:, :, own]], dim=2), attn_mask=mask))
        rows.append(torch.cat(pieces, dim=2))
    return torch.cat(rows).transpose(1, 2).contiguous(), None


class _BlockMasks:
    """The block mask of the last position ids seen: every layer of a forward gets the same ones (a fresh
    tensor each under Ulysses, which gathers them a layer), and building the mask is the costly part."""

    def __init__(self):
        self.position_ids: torch.Tensor | None = None
        self.mask: BlockMask | None = None

    def of(self, position_ids: torch.Tensor) -> BlockMask:
        known = self.position_ids
        if known is None or known.shape != position_ids.shape or known.device != position_ids.device:
            known = None
        if known is None or not torch.equal(known, position_ids):
            self.position_ids, self.mask = position_ids.clone(), PackedLayout.of(position_ids).block_mask()
        return self.mask


BLOCK_MASKS = _BlockMasks()


def flex_packed_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    position_ids: torch.Tensor | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """As `sdpa_packed`, for training rows (no KV cache) through flex attention: compiled on GPUs (eager
    flex materialises the scores), eager elsewhere (the CPU tests of the rule)."""
    if query.shape[2] != key.shape[2] or position_ids is None:
        raise ValueError("flex_packed runs packed rows, told apart by their position ids, without a KV cache")
    if dropout:
        raise ValueError("flex_packed has no attention dropout")
    attend = compile_friendly_flex_attention if query.is_cuda else flex_attention
    kwargs = {"training": module.training} if query.is_cuda else {}
    out = attend(query, key, value, block_mask=BLOCK_MASKS.of(position_ids), scale=scaling, enable_gqa=True, **kwargs)
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register("sdpa_packed", sdpa_packed_attention)
AttentionInterface.register("flex_packed", flex_packed_attention)
