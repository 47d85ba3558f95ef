"""Rewards: rule-based verifiers, a model verifier over HTTP, and the scorer that runs them safely."""

from rl.rewards.registry import REWARDS, VERIFIER, RewardSpec, resolve
from rl.rewards.scorer import RewardConfig, RewardScorer
from rl.rewards.types import STATUSES, RewardRequest, RewardResult

__all__ = [
    "REWARDS",
    "STATUSES",
    "VERIFIER",
    "RewardConfig",
    "RewardRequest",
    "RewardResult",
    "RewardScorer",
    "RewardSpec",
    "resolve",
]
