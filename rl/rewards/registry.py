"""Reward names (a sample's `reward` field) and the functions behind them; `pkg.module:fn` names a user's."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from rl.rewards import grounding, verifiable
from step3vl_train.usage import UsageError, import_callable


@dataclass(frozen=True)
class RewardSpec:
    fn: Callable[..., float]  # fn(request, **options) -> score in [0, 1]
    boxed: bool  # reads a single `\boxed{}` answer: several boxed answers are refused before scoring


REWARDS: dict[str, RewardSpec] = {
    "math": RewardSpec(verifiable.math_reward, boxed=True),
    "choice": RewardSpec(verifiable.choice_reward, boxed=True),
    "counting": RewardSpec(verifiable.counting_reward, boxed=True),
    "numeric": RewardSpec(verifiable.numeric_reward, boxed=True),
    "grounding": RewardSpec(grounding.grounding_reward, boxed=False),
    "pointing": RewardSpec(grounding.pointing_reward, boxed=False),
    "point_in_box": RewardSpec(grounding.point_in_box_reward, boxed=False),
}
# Scored by a model behind an OpenAI-compatible endpoint (`verifier.py`), not in the process pool.
VERIFIER = "verifier"
# Scored by the reward-model service (rl/serve_rm.py, `rm_client.py`): RLHF's open-ended prompts.
REWARD_MODEL = "reward_model"
REMOTE = (VERIFIER, REWARD_MODEL)


def resolve(name: str) -> RewardSpec:
    """A registered reward, or a user's function by import path (`my_pkg.rewards:exact_match`)."""
    if name in REWARDS:
        return REWARDS[name]
    if ":" not in name:
        raise KeyError(
            f"unknown reward {name!r}: one of {sorted(REWARDS) + list(REMOTE)}, or 'package.module:function'"
        )
    try:
        fn = import_callable(name, "reward")
    except UsageError as error:
        raise KeyError(str(error)) from error
    return RewardSpec(fn, boxed=False)
