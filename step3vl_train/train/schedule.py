"""The learning rate as a function of tokens trained (see `ScheduleConfig`)."""

from __future__ import annotations

import math

import torch

from step3vl_train.train.config import ScheduleConfig


def lr_factor(tokens: int, cfg: ScheduleConfig, warmup_tokens: int | None = None) -> float:
    """The fraction of a group's peak learning rate after `tokens` trained tokens."""
    warmup = cfg.warmup_tokens if warmup_tokens is None else warmup_tokens
    if tokens < warmup:
        return tokens / warmup
    if cfg.shape == "constant" or tokens >= cfg.decay_tokens:
        return 1.0 if cfg.shape == "constant" else cfg.min_lr_ratio
    progress = (tokens - warmup) / max(1, cfg.decay_tokens - warmup)
    decay = 0.5 * (1 + math.cos(math.pi * progress)) if cfg.shape == "cosine" else 1 - progress
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * decay


def apply_schedule(optimizer: torch.optim.Optimizer, tokens: int, cfg: ScheduleConfig) -> dict[str, float]:
    """Sets each param group's lr for the step about to be taken; returns them by group name."""
    lrs = {}
    for group in optimizer.param_groups:
        group["lr"] = group["peak_lr"] * lr_factor(tokens, cfg, group["warmup_tokens"])
        lrs[group["name"]] = group["lr"]
    return lrs
