"""`sdpa_packed`: the CPU reference kernel for packed rows under sequence parallelism.

DeepSpeed's Ulysses wrapper hands the core kernel the whole row's position ids (gathered over the
sequence-parallel ranks) and drops the mask transformers built for the local shard. On GPUs the core is
flash-attention, whose varlen path finds the samples in those position ids. There is no such kernel on
the CPU, so this one builds the block-diagonal causal mask from the position ids itself: (L x L), fine for
the CPU's short test rows, refused on GPUs (compute.resolve_attention).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.masking_utils import find_packed_sequence_indices


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

    Rows are packed samples told apart by restarting `position_ids` (B, Lq); a query attends to the
    earlier keys of its own sample. A decode step over a KV cache (Lq < Lk, one unpadded row, as in
    generation) attends to every cached key."""
    mask, causal = None, False
    if query.shape[2] == key.shape[2]:
        causal = True
        samples = find_packed_sequence_indices(position_ids) if position_ids is not None else None
        if samples is not None:
            length = query.shape[2]
            earlier = torch.ones(length, length, dtype=torch.bool, device=query.device).tril()
            mask = (samples[:, :, None] == samples[:, None, :]) & earlier
            mask, causal = mask[:, None], False
    elif query.shape[0] != 1 or query.shape[2] != 1:
        raise ValueError("sdpa_packed decodes one unpadded row at a time")
    out = F.scaled_dot_product_attention(
        query, key, value, attn_mask=mask, is_causal=causal, scale=scaling, dropout_p=dropout, enable_gqa=True
    )
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register("sdpa_packed", sdpa_packed_attention)
