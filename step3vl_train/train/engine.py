"""The model under DeepSpeed ZeRO-3: built already partitioned, wrapped with our AdamW param groups."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import deepspeed
import torch
from transformers.integrations import HfDeepSpeedConfig

from step3vl_train.model import Step3VLConfig, Step3VLForConditionalGeneration
from step3vl_train.model.checkpoint import check_state_dict, read_released_tensors
from step3vl_train.model.value import CRITIC_ONLY, POLICY_ONLY, Step3VLForValue
from step3vl_train.train.config import OptimConfig
from step3vl_train.train.optim import build_optimizer, build_param_groups


@dataclass
class Engine:
    engine: deepspeed.DeepSpeedEngine
    model: Step3VLForConditionalGeneration  # the module the engine wraps
    # transformers reads ZeRO-3 settings through this object while it is alive (weight init, loading).
    hf_deepspeed_config: HfDeepSpeedConfig


def deepspeed_config(
    base: dict[str, Any], micro_batch_size: int, grad_accum: int, grad_clip: float, bf16: bool
) -> dict[str, Any]:
    """The DeepSpeed config: `base` (configs/deepspeed/*.yaml) plus what the trainer decides."""
    return {
        **base,
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": grad_accum,
        "gradient_clipping": grad_clip,
        "bf16": {"enabled": bf16},
    }


def build_engine(
    model_config: Step3VLConfig,
    optim: OptimConfig,
    ds_config: dict[str, Any],
    init_from: str | None = None,
    model_class: type[Step3VLForConditionalGeneration] = Step3VLForConditionalGeneration,
    freeze: tuple[str, ...] = (),
) -> Engine:
    """Builds the model partitioned from the start (transformers' zero.Init path, which also gathers each
    module to initialise it), loads `init_from` (a released-format directory) if given, then wraps it in
    DeepSpeed. The weights must be in place before `deepspeed.initialize`, which takes its fp32 master
    copies from them. Parameters whose names start with a prefix in `freeze` are not trained. Call after
    torch.distributed is initialised."""
    hf_deepspeed_config = HfDeepSpeedConfig(ds_config)
    dtype = torch.bfloat16 if ds_config.get("bf16", {}).get("enabled") else torch.float32
    model = model_class._from_config(model_config, dtype=dtype)
    if init_from:
        load_released_into(model, init_from)
    if freeze:
        for name, param in model.named_parameters():
            param.requires_grad_(not name.startswith(freeze))
    optimizer = build_optimizer(build_param_groups(model, optim), optim)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
    return Engine(engine, model, hf_deepspeed_config)


def load_released_into(model: Step3VLForConditionalGeneration, directory: str) -> None:
    """Copies a released-format checkpoint into a ZeRO-3 partitioned model: each parameter is gathered,
    rank 0 writes the stored tensor into it, and DeepSpeed partitions it again on leaving the context.
    Names and shapes are checked first, on every rank, so a mismatch fails everywhere at once."""
    tensors = read_released_tensors(directory)  # every rank reads: the check below needs the shapes
    expected = {name: tuple(getattr(param, "ds_shape", param.shape)) for name, param in model.named_parameters()}
    if isinstance(model, Step3VLForValue):  # a critic starts from a policy: its own head keeps its init
        tensors = {name: t for name, t in tensors.items() if not name.startswith(POLICY_ONLY)}
        expected = {name: shape for name, shape in expected.items() if not name.startswith(CRITIC_ONLY)}
    check_state_dict(expected, {name: tuple(t.shape) for name, t in tensors.items()}, directory)
    rank = torch.distributed.get_rank()
    for name, param in model.named_parameters():
        if name not in tensors:
            continue
        with deepspeed.zero.GatheredParameters([param], modifier_rank=0):
            if rank == 0:
                param.data.copy_(tensors[name])
