"""Rollout engines: generate responses with their log-probs, take new weights from the trainer."""

from rl.engines.base import RolloutEngine, SamplingParams

__all__ = ["RolloutEngine", "SamplingParams", "build_rollout_engine", "engine_environment", "engine_options"]


def engine_environment(rollout) -> dict[str, str]:
    """Environment variables an engine's process needs, from `rollout` (a `RolloutConfig`). vLLM passes a
    weight update to its engine-core process through its msgpack encoder, which refuses the CUDA-IPC
    handles (`reduce_tensor`'s arguments hold types and a dtype) unless pickling is allowed. The engine core
    listens on this machine only, and only our trainer sends to it."""
    if rollout.engine == "vllm" and rollout.weight_transfer == "ipc":
        return {"VLLM_ALLOW_INSECURE_SERIALIZATION": "1"}
    return {}


def engine_options(cfg, pad_token_id: int, load_weights: bool, index: int = 0, restarts: int = 0) -> dict:
    """`build_rollout_engine`'s keyword arguments from an `RLConfig`, for engine `index` of the run's
    `restarts`-th start. The transformers engine is built from the model config and, unless `load_weights`,
    takes its weights from the first sync; vLLM always loads `rollout.model` (default: `policy.init_from`)
    and samples with a seed of its own: `trainer.seed` + its index + restarts x engines."""
    import torch

    rollout = cfg.rollout
    if rollout.engine == "hf":
        return {
            "model_config": cfg.model,
            "init_from": cfg.policy.init_from if load_weights else None,
            "pad_token_id": pad_token_id,
            "batch_size": rollout.batch_size,
            "dtype": torch.bfloat16 if cfg.trainer.use_bf16 else torch.float32,
        }
    return {
        "model": rollout.model or cfg.policy.init_from,
        "tokenizer": cfg.tokenizer,
        "pad_token_id": pad_token_id,
        "processor_config": cfg.processor or None,
        "tensor_parallel_size": rollout.tensor_parallel_size,
        "gpu_memory_utilization": rollout.gpu_memory_utilization,
        "enforce_eager": rollout.enforce_eager,
        "weight_transfer": rollout.weight_transfer,
        "seed": cfg.trainer.seed + index + restarts * rollout.num_engines,
    }


def build_rollout_engine(name: str, **kwargs) -> RolloutEngine:
    if name == "hf":
        from rl.engines.hf import HFEngine

        return HFEngine(**kwargs)
    if name == "vllm":
        from rl.engines.vllm import VLLMEngine

        return VLLMEngine(**kwargs)
    raise ValueError(f"rollout.engine must be 'hf' or 'vllm', not {name!r}")
