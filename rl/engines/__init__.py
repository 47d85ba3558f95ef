"""Rollout engines: generate responses with their log-probs, take new weights from the trainer."""

from rl.engines.base import RolloutEngine, SamplingParams

__all__ = ["RolloutEngine", "SamplingParams", "build_rollout_engine"]


def build_rollout_engine(name: str, **kwargs) -> RolloutEngine:
    if name == "hf":
        from rl.engines.hf import HFEngine

        return HFEngine(**kwargs)
    if name == "vllm":
        from rl.engines.vllm import VLLMEngine

        return VLLMEngine(**kwargs)
    raise ValueError(f"rollout.engine must be 'hf' or 'vllm', not {name!r}")
