"""The learning rate as a function of tokens trained (see `ScheduleConfig` and, for later phases,
`DecayConfig`): one curve for the whole run, continuous across its phases."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from step3vl_train.train.config import DecayConfig, ScheduleConfig


def lr_factor(
    tokens: int,
    cfg: ScheduleConfig,
    warmup_tokens: int | None = None,
    phases: Sequence[tuple[int, DecayConfig]] = (),
) -> float:
    """The fraction of a group's peak learning rate after `tokens` trained tokens. `phases` are the later
    phases' (start_tokens, schedule), in order: each takes over at its start from the factor reached there."""
    started = [phase for phase in phases if phase[0] <= tokens]
    if started:
        start, decay = started[-1]
        high = lr_factor(start, cfg, warmup_tokens, phases[: len(started) - 1])
        progress = 1.0 if decay.decay_tokens <= start else min(1.0, (tokens - start) / (decay.decay_tokens - start))
        return _decayed(decay.shape, progress, high, decay.min_lr_ratio)
    warmup = cfg.warmup_tokens if warmup_tokens is None else warmup_tokens
    if tokens < warmup:
        return tokens / warmup
    progress = min(1.0, (tokens - warmup) / max(1, cfg.decay_tokens - warmup))
    return _decayed(cfg.shape, progress, 1.0, cfg.min_lr_ratio)


def _decayed(shape: str, progress: float, high: float, low: float) -> float:
    """From `high` at progress 0 to `low` at 1 along `shape`; `constant` stays at `high`."""
    if shape == "constant":
        return high
    fraction = 0.5 * (1 + math.cos(math.pi * progress)) if shape == "cosine" else 1 - progress
    return low + (high - low) * fraction


def apply_schedule(
    optimizer: torch.optim.Optimizer,
    tokens: int,
    cfg: ScheduleConfig,
    phases: Sequence[tuple[int, DecayConfig]] = (),
) -> dict[str, float]:
    """Sets each param group's lr for the step about to be taken; returns them by group name."""
    lrs = {}
    for group in optimizer.param_groups:
        group["lr"] = group["peak_lr"] * lr_factor(tokens, cfg, group["warmup_tokens"], phases)
        lrs[group["name"]] = group["lr"]
    return lrs
