"""Advantage estimators over a batch of responses. Tensors are (B, T) over response tokens, with
`mask` 1 on real response tokens; `rewards` (B,) is each response's terminal reward and `groups` (B,) the
index of its prompt (responses to one prompt share it).

`gae` (the paper's, with a critic) is token-level; the critic-free estimators give every token of a
response the same advantage.
"""

from __future__ import annotations

import torch

ESTIMATORS = ("gae", "grpo", "rloo", "reinforce_pp")


def terminal_rewards(rewards: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B, T): each response's reward on its last token, 0 elsewhere (sparse terminal reward)."""
    last = (mask.cumsum(1) == mask.sum(1, keepdim=True)) & mask.bool()
    return torch.where(last, rewards[:, None].to(torch.float32), torch.zeros_like(mask, dtype=torch.float32))


def gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0, lam: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation. Returns (advantages, returns); with gamma = lambda = 1 the
    advantage of token t is R - V(s_t), and the return is R."""
    token_rewards = terminal_rewards(rewards, mask)
    values = values.float() * mask
    advantages = torch.zeros_like(token_rewards)
    running = torch.zeros(rewards.shape[0])
    for t in reversed(range(mask.shape[1])):
        next_value = values[:, t + 1] if t + 1 < mask.shape[1] else torch.zeros_like(running)
        delta = token_rewards[:, t] + gamma * next_value - values[:, t]
        running = delta + gamma * lam * running
        running = running * mask[:, t]  # padding neither carries nor receives credit
        advantages[:, t] = running
    return advantages, (advantages + values) * mask


def group_statistics(rewards: torch.Tensor, groups: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per response: its group's mean reward, standard deviation (unbiased) and size."""
    _, index, counts = torch.unique(groups, return_inverse=True, return_counts=True)
    rewards = rewards.float()
    sums = torch.zeros(len(counts)).index_add_(0, index, rewards)
    means = sums / counts
    squares = torch.zeros(len(counts)).index_add_(0, index, (rewards - means[index]) ** 2)
    std = (squares / (counts - 1).clamp(min=1)).sqrt()
    return means[index], std[index], counts[index].float()


def grpo(rewards: torch.Tensor, groups: torch.Tensor, scale_by_std: bool = True, eps: float = 1e-6) -> torch.Tensor:
    """(R - group mean) / (group std + eps), or without the division (Dr. GRPO) when not `scale_by_std`."""
    mean, std, _ = group_statistics(rewards, groups)
    centred = rewards.float() - mean
    return centred / (std + eps) if scale_by_std else centred


def rloo(rewards: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
    """Leave-one-out baseline: R minus the mean of the other responses to the same prompt (0 for a
    response with no other: it has no baseline)."""
    mean, _, size = group_statistics(rewards, groups)
    return torch.where(size > 1, (rewards.float() - mean) * size / (size - 1).clamp(min=1), 0.0)


def reinforce_pp(rewards: torch.Tensor, groups: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """REINFORCE++ with the group-mean baseline, then whitened over every response token of the batch."""
    centred = (rewards.float() - group_statistics(rewards, groups)[0])[:, None].expand_as(mask.float())
    return whiten(centred, mask)


def whiten(values: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    mask = mask.float()
    mean = (values * mask).sum() / mask.sum()
    var = (((values - mean) * mask) ** 2).sum() / mask.sum()
    return (values - mean) * torch.rsqrt(var + eps) * mask


def compute_advantages(
    estimator: str,
    rewards: torch.Tensor,
    mask: torch.Tensor,
    groups: torch.Tensor,
    values: torch.Tensor | None = None,
    gamma: float = 1.0,
    lam: float = 1.0,
    scale_by_std: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(advantages (B, T), returns (B, T) for the critic, or None without one)."""
    if estimator == "gae":
        if values is None:
            raise ValueError("gae needs the critic's values (critic.enabled=true)")
        return gae(rewards, values, mask, gamma, lam)
    if estimator == "grpo":
        per_response = grpo(rewards, groups, scale_by_std)
    elif estimator == "rloo":
        per_response = rloo(rewards, groups)
    elif estimator == "reinforce_pp":
        return reinforce_pp(rewards, groups, mask), None
    else:
        raise ValueError(f"algo.estimator must be one of {ESTIMATORS}, not {estimator!r}")
    return per_response[:, None] * mask, None


def uniform_groups(rewards: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
    """(B,) bool: the response's group has one reward for all (no learning signal: dynamic sampling drops it)."""
    _, std, size = group_statistics(rewards, groups)
    return (std == 0) & (size > 1)
