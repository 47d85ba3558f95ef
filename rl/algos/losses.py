"""PPO's clipped surrogate with truncated importance sampling, the critic's loss, and how token losses
are aggregated. Every aggregate is a sum divided by a count of the *global* batch (all ranks and
micro-batches of the minibatch), handed in by the caller, so the gradient does not depend on how the
batch is split."""

from __future__ import annotations

from dataclasses import dataclass

import torch

AGGREGATIONS = ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean")


@dataclass
class GlobalCounts:
    tokens: int  # response tokens in the global minibatch
    sequences: int  # responses in the global minibatch


def aggregate(
    token_losses: torch.Tensor,
    mask: torch.Tensor,
    mode: str,
    counts: GlobalCounts,
    responses: torch.Tensor | None = None,
) -> torch.Tensor:
    """token-mean: every token of the global batch weighs the same (longer responses weigh more);
    seq-mean-token-mean: every response weighs the same; seq-mean-token-sum: sums over a response's tokens,
    then the mean over responses (Dr. GRPO's constant normaliser when responses have a fixed budget).
    `responses`: where rows hold several (SequenceBatch.response_index); None: a response a row."""
    mask = mask.to(token_losses.dtype)
    if mode == "token-mean":
        return (token_losses * mask).sum() / max(counts.tokens, 1)
    if responses is None:
        per_sequence, tokens = (token_losses * mask).sum(1), mask.sum(1)
    else:
        inside, count = responses >= 0, int(responses.max()) + 1
        per_sequence = mask.new_zeros(count).index_add(0, responses[inside], (token_losses * mask)[inside])
        tokens = mask.new_zeros(count).index_add(0, responses[inside], mask[inside])
    if mode == "seq-mean-token-mean":
        per_sequence = per_sequence / tokens.clamp(min=1)
    elif mode != "seq-mean-token-sum":
        raise ValueError(f"algo.loss_aggregation must be one of {AGGREGATIONS}, not {mode!r}")
    return per_sequence.sum() / max(counts.sequences, 1)


def policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    rollout_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    counts: GlobalCounts,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    tis_cap: float | None = 8.0,
    aggregation: str = "token-mean",
    responses: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """-min(ρA, clip(ρ, 1-ε_low, 1+ε_high)A) with ρ = π/π_old, each token weighted by the truncated
    importance ratio min(π_old/π_rollout, C) (Yao et al. 2025): the rollout engine's probabilities differ
    from the trainer's, and this corrects the policy gradient for it. `tis_cap` None turns it off."""
    ratio = torch.exp(logprobs - old_logprobs)
    unclipped = ratio * advantages
    clipped = ratio.clamp(1 - clip_low, 1 + clip_high) * advantages
    token_losses = -torch.minimum(unclipped, clipped)
    if tis_cap is not None:
        weights = torch.exp(old_logprobs - rollout_logprobs).clamp(max=tis_cap).detach()
        token_losses = token_losses * weights
    loss = aggregate(token_losses, mask, aggregation, counts, responses)
    with torch.no_grad():
        m = mask.bool()
        stats = {
            "clip_fraction": ((unclipped > clipped) & m).float().sum(),  # tokens whose gradient the clip removed
            "approx_kl": ((ratio - 1) - (logprobs - old_logprobs))[m].sum(),  # k3 estimator of KL(π_old, π)
        }
    return loss, stats


def value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    counts: GlobalCounts,
    clip: float | None = None,
    aggregation: str = "token-mean",
    responses: torch.Tensor | None = None,
) -> torch.Tensor:
    """0.5 (V - G)^2, optionally PPO's clipped value loss around the values at rollout time."""
    losses = (values - returns) ** 2
    if clip is not None:
        clipped = old_values + (values - old_values).clamp(-clip, clip)
        losses = torch.maximum(losses, (clipped - returns) ** 2)
    return 0.5 * aggregate(losses, mask, aggregation, counts, responses)


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> float | None:
    """1 - Var(G - V) / Var(G) over response tokens: 1 is a perfect critic, 0 no better than a constant;
    None when the returns do not vary (every reward the same)."""
    m = mask.bool()
    returns, values = returns[m].double(), values[m].double()
    variance = returns.var(unbiased=False)
    if len(returns) < 2 or variance < 1e-12:
        return None
    return float(1 - (returns - values).var(unbiased=False) / variance)
