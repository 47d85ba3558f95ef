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

`sdpa_packed` is the CPU's reference, refused on GPUs by compute.resolve_attention: one call under an (L x L)
mask where no sample continues a prompt, else a call a sample (a Python loop); `flex_packed` builds a block
mask from the same rule, once a forward.
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
    def shares_prompts(self) -> bool:
        """Whether a sample continues a prompt."""
        return bool((self.prefix_end > self.prefix_start).any())

    @property
    def is_causal(self) -> bool:
        """One sample a row, sharing no prompt: the plain causal mask."""
        return bool((self.sample[:, -1] == self.sample[:, 0]).all()) and not self.shares_prompts

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


@dataclass
class SamplePiece:
    """One sample of a row, as `sdpa_packed` runs it."""

    own: slice  # its tokens
    prompt: slice  # the keys of the prompt it continues (empty: none)
    mask: torch.Tensor | None  # (own, prompt + own) where its queries alone go in with an explicit mask


@dataclass
class PackedPlan:
    """How `sdpa_packed` runs a batch's rows: plainly causal (neither field: one sample a row, from 0); one
    call under the samples' block-diagonal mask (`mask`, (B, 1, L, L): rows whose samples share nothing, as
    pre-training and SFT pack them, at the CPU's lengths); or a call a sample (`pieces`, each row's: rows where
    samples continue a prompt)."""

    mask: torch.Tensor | None = None
    pieces: list[list[SamplePiece]] | None = None


def packed_plan(position_ids: torch.Tensor) -> PackedPlan:
    """A sample with a prompt takes the prompt's keys, then its own, causally; where it is the longer part,
    the prompt's queries go in too and their outputs are dropped (no mask): the causal kernel skips the
    masked half, which costs less than an explicit mask over the sample's own keys."""
    layout = PackedLayout.of(position_ids)
    if layout.is_causal:
        return PackedPlan()
    if not layout.shares_prompts:
        earlier = torch.ones(position_ids.shape[1], position_ids.shape[1], dtype=torch.bool).tril()
        mask = (layout.sample[:, :, None] == layout.sample[:, None, :]) & earlier.to(position_ids.device)
        return PackedPlan(mask=mask[:, None])
    rows = []
    for row in range(position_ids.shape[0]):
        sample = layout.sample[row]
        starts = torch.nonzero(torch.diff(sample, prepend=sample[:1] - 1)).flatten().tolist()
        pieces = []
        for start, end in zip(starts, [*starts[1:], len(sample)], strict=True):
            prompt = slice(int(layout.prefix_start[row, start]), int(layout.prefix_end[row, start]))
            length, prompt_length, mask = end - start, prompt.stop - prompt.start, None
            if prompt_length and prompt_length >= length:
                mask = torch.ones(length, length, dtype=torch.bool, device=position_ids.device).tril()
                mask = torch.cat([mask.new_ones(length, prompt_length), mask], dim=1)
            pieces.append(SamplePiece(slice(start, end), prompt, mask))
        rows.append(pieces)
    return PackedPlan(pieces=rows)


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

    Rows are packed samples told apart by `position_ids` (B, Lq), as above (`packed_plan`: where samples
    continue a prompt, one call a sample, so that a row costs what its samples cost apart). A decode step
    over a KV cache (Lq < Lk, one unpadded row, as in generation) attends to every cached key."""
    attend = functools.partial(F.scaled_dot_product_attention, scale=scaling, dropout_p=dropout, enable_gqa=True)
    if query.shape[2] != key.shape[2]:
        if query.shape[0] != 1 or query.shape[2] != 1:
            raise ValueError("sdpa_packed decodes one unpadded row at a time")
        return attend(query, key, value).transpose(1, 2).contiguous(), None
    plan = PACKED_PLANS.of(position_ids) if position_ids is not None else PackedPlan()
    if plan.pieces is None:
        out = attend(query, key, value, attn_mask=plan.mask, is_causal=plan.mask is None)
        return out.transpose(1, 2).contiguous(), None
    rows = []
    for row, pieces in enumerate(plan.pieces):
        q, k, v = query[row : row + 1], key[row : row + 1], value[row : row + 1]
        outputs = []
        for piece in pieces:
            own, prompt = piece.own, piece.prompt
            if prompt.start == prompt.stop:
                outputs.append(attend(q[:, :, own], k[:, :, own], v[:, :, own], is_causal=True))
                continue
            keys = torch.cat([k[:, :, prompt], k[:, :, own]], dim=2)
            values = torch.cat([v[:, :, prompt], v[:, :, own]], dim=2)
            if piece.mask is not None:
                outputs.append(attend(q[:, :, own], keys, values, attn_mask=piece.mask))
                continue
            queries = torch.cat([q[:, :, prompt], q[:, :, own]], dim=2)
            outputs.append(attend(queries, keys, values, is_causal=True)[:, :, prompt.stop - prompt.start :])
        rows.append(torch.cat(outputs, dim=2))
    return torch.cat(rows).transpose(1, 2).contiguous(), None


class PerPositions:
    """What `build` makes of the last position ids seen: every layer of a forward gets the same ones (the
    same tensor, or under Ulysses a fresh gathered one a layer, compared by value), and building is the
    costly part."""

    def __init__(self, build):
        self.build = build
        self.seen: torch.Tensor | None = None  # the tensor last given
        self.position_ids: torch.Tensor | None = None  # a copy of its values
        self.built = None

    def of(self, position_ids: torch.Tensor):
        if position_ids is self.seen:
            return self.built
        known = self.position_ids
        same = (
            known is not None
            and known.shape == position_ids.shape
            and known.device == position_ids.device
            and torch.equal(known, position_ids)
        )
        if not same:
            self.position_ids, self.built = position_ids.clone(), self.build(position_ids)
        self.seen = position_ids
        return self.built


PACKED_PLANS = PerPositions(packed_plan)
BLOCK_MASKS = PerPositions(lambda position_ids: PackedLayout.of(position_ids).block_mask())


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
