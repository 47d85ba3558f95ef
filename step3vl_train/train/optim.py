"""Parameter groups by regex on names, and the AdamW optimizer over them.

Groups are tried in order and the first whose pattern matches a parameter's name claims it. A pattern
that claims nothing, or a trainable parameter that no group claims, is an error: a typo in a pattern
would otherwise train the wrong parameters with the wrong settings, silently.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import nn

from step3vl_train.train.config import OptimConfig


class ParamGroupError(ValueError):
    """A param-group pattern that claims nothing, or a trainable parameter no group claims."""


@dataclass
class ParamGroup:
    name: str
    params: list[nn.Parameter]
    names: list[str]
    lr: float  # peak
    weight_decay: float
    warmup_tokens: int


def hyperparameters(cfg: OptimConfig) -> dict[str, dict]:
    """Each param group's settings by group name, as the optimizer's groups carry them: the schedule reads
    `peak_lr` and `warmup_tokens`; unset fields take the optimizer's values."""
    return {
        group.name: {
            "peak_lr": group.lr if group.lr is not None else cfg.lr,
            "weight_decay": group.weight_decay if group.weight_decay is not None else cfg.weight_decay,
            "warmup_tokens": group.warmup_tokens if group.warmup_tokens is not None else cfg.schedule.warmup_tokens,
            "betas": tuple(cfg.betas),
            "eps": cfg.eps,
        }
        for group in cfg.param_groups
    }


def build_param_groups(model: nn.Module, cfg: OptimConfig) -> list[ParamGroup]:
    patterns = [(group, re.compile(group.pattern)) for group in cfg.param_groups]
    claimed: dict[str, list[tuple[str, nn.Parameter]]] = {group.name: [] for group in cfg.param_groups}
    unclaimed = []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        owner = next((group.name for group, pattern in patterns if pattern.search(name)), None)
        if owner is None:
            unclaimed.append(name)
        else:
            claimed[owner].append((name, param))
    empty = [group.name for group in cfg.param_groups if not claimed[group.name]]
    if empty or unclaimed:
        problems = [f"group(s) {empty} claim no trainable parameter"] if empty else []
        problems += [f"no group claims {unclaimed[:5]}{' ...' if len(unclaimed) > 5 else ''}"] if unclaimed else []
        raise ParamGroupError("optim.param_groups: " + "; ".join(problems))
    settings = hyperparameters(cfg)
    return [
        ParamGroup(
            name=group.name,
            params=[param for _, param in claimed[group.name]],
            names=[name for name, _ in claimed[group.name]],
            lr=settings[group.name]["peak_lr"],
            weight_decay=settings[group.name]["weight_decay"],
            warmup_tokens=settings[group.name]["warmup_tokens"],
        )
        for group in cfg.param_groups
    ]


def build_optimizer(groups: list[ParamGroup], cfg: OptimConfig) -> torch.optim.AdamW:
    """AdamW whose param groups carry their name, peak lr and warmup for the schedule to read."""
    return torch.optim.AdamW(
        [
            {
                "params": g.params,
                "name": g.name,
                "lr": g.lr,
                "peak_lr": g.lr,
                "weight_decay": g.weight_decay,
                "warmup_tokens": g.warmup_tokens,
            }
            for g in groups
        ],
        lr=cfg.lr,
        betas=tuple(cfg.betas),
        eps=cfg.eps,
    )


def apply_hyperparameters(optimizer: torch.optim.Optimizer, cfg: OptimConfig) -> None:
    """Writes the config's settings over the optimizer's groups, by group name: DeepSpeed restores an
    optimizer state with the settings it was saved with, and a resumed run follows its current config."""
    settings = hyperparameters(cfg)
    for group in optimizer.param_groups:
        group.update(settings[group["name"]])
