"""Log-probabilities (and entropy) of target tokens, computed an `lm_head` tile at a time.

The language-model loss and RL's log-probs both need log p(target) at some positions. Run over a whole
sequence, the head's logits are (L x vocabulary): at 128K tokens and Qwen3's 151,936-token vocabulary
that is 40 GB in bf16 and twice that once upcast. Here the caller hands in only the hidden states of the
positions that count, and the head runs over `chunks` tiles of them; each tile's logits live only while
that tile is computed, in the forward pass and again in the backward pass, which recomputes them (one
extra head forward, about 2.5% of a step of the 10B model) rather than keep them.

DeepSpeed's ALST pieces were the first choice and do not fit: `SequenceTiledCompute` needs outputs shaped
like its input (an MLP's), and `TiledFusedLogitsLoss` runs the backward inside the forward with an
upstream gradient of 1, so a loss scaled afterwards (by the global token count, by the world size) would
scale the hidden states' gradient but not the head's. The ZeRO-3 device they use is the same as ours:
`ds_grad_is_ready` holds the head's gradient out of ZeRO's reduce buckets until the last tile.

Under ZeRO-3 the head's weight is kept whole on every rank (train/engine.py: keep_whole), so a call
gathers nothing and each rank tiles its own positions; a rank with none still calls the head once, on an
empty tile, so that its gradient (zeros) joins the reduce as every other rank's does.
"""

from __future__ import annotations

import math

import torch
from torch import nn


def token_scores(
    head: nn.Module,
    hidden: torch.Tensor,
    targets: torch.Tensor,
    chunks: int,
    temperature: float = 1.0,
    with_entropy: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """log p(targets) under softmax(head(hidden) / temperature), and the entropy of that distribution.

    hidden: (N, hidden_size), the positions that count; targets: (N,) token ids.
    Returns (N,) float32 log-probs, differentiable with respect to `hidden` and the head's weight, and
    (N,) float32 entropies (not differentiable) when `with_entropy`, else None.
    """
    if chunks < 1:
        raise ValueError(f"chunks must be at least 1, not {chunks}")
    if torch.is_grad_enabled() and head.weight.requires_grad and not hidden.requires_grad:
        raise ValueError("the head is trained only through the hidden states' graph: they must require grad")
    logprobs, entropy = _TiledTokenScores.apply(hidden, targets, head, chunks, temperature, with_entropy)
    return logprobs, entropy if with_entropy else None


def chunk_count(positions: int, chunk: int) -> int:
    """Tiles of at most `chunk` positions that cover `positions` (at least one: the head is always called)."""
    return max(1, math.ceil(positions / chunk)) if chunk > 0 else 1


class _TiledTokenScores(torch.autograd.Function):
    """The head's weight is no input of this function: its gradient is accumulated by the head calls
    recomputed in backward. (As an input returning no gradient, ZeRO-3's post-accumulate hook would still
    fire for it and reduce it twice.)"""

    @staticmethod
    def forward(ctx, hidden, targets, head, chunks, temperature, with_entropy):
        ctx.head, ctx.chunks, ctx.temperature = head, chunks, temperature
        ctx.save_for_backward(hidden, targets)
        logprobs = torch.empty(targets.shape, dtype=torch.float32, device=hidden.device)
        entropy = torch.zeros_like(logprobs)
        for part in _tiles(targets.shape[0], chunks):
            with torch.no_grad():
                logits = head(hidden[part]).float().div_(temperature)
                normaliser = torch.logsumexp(logits, dim=-1)
                logprobs[part] = logits.gather(-1, targets[part, None]).squeeze(-1) - normaliser
                if with_entropy:
                    # H = logsumexp(z) - sum(softmax(z) * z), one tile of exp at a time.
                    entropy[part] = normaliser - (logits - normaliser[:, None]).exp_().mul_(logits).sum(-1)
        ctx.mark_non_differentiable(entropy)
        return logprobs, entropy

    @staticmethod
    def backward(ctx, grad_logprobs, _grad_entropy):
        hidden, targets = ctx.saved_tensors
        head, temperature = ctx.head, ctx.temperature
        hidden = hidden.detach().requires_grad_(hidden.requires_grad)
        grad_hidden = torch.zeros_like(hidden) if hidden.requires_grad else None
        weight = head.weight
        tiles = list(_tiles(targets.shape[0], ctx.chunks))
        for index, part in enumerate(tiles):
            # ZeRO-3 reduces a parameter's gradient as it is accumulated; hold the head's back until the
            # last tile has added to it.
            weight.ds_grad_is_ready = index == len(tiles) - 1
            piece = hidden[part].detach().requires_grad_(hidden.requires_grad)
            with torch.enable_grad():
                logits = head(piece)
            with torch.no_grad():
                # d log p(y) / d z = onehot(y) - softmax(z), for z = logits / T; written in place over one
                # fp32 copy of the tile.
                upstream = grad_logprobs[part].float()
                grad = logits.detach().to(torch.float32, copy=True).div_(temperature)
                grad = grad.sub_(torch.logsumexp(grad, dim=-1, keepdim=True)).exp_().mul_(-upstream[:, None])
                grad.scatter_add_(-1, targets[part, None], upstream[:, None])
                grad = grad.div_(temperature).to(logits.dtype)
            if logits.requires_grad:
                torch.autograd.backward(logits, grad)
            if grad_hidden is not None and piece.grad is not None:
                grad_hidden[part] = piece.grad
        weight.ds_grad_is_ready = True
        return grad_hidden, None, None, None, None, None


def _tiles(positions: int, chunks: int):
    """`chunks` slices covering [0, positions) in order; trailing ones may be empty."""
    step = math.ceil(positions / chunks) if positions else 0
    for index in range(chunks):
        start = min(index * step, positions)
        yield slice(start, min(start + step, positions))
