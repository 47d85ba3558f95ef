"""The model under DeepSpeed ZeRO-3: built already partitioned, wrapped with our AdamW param groups."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import deepspeed
import torch
from transformers.integrations import HfDeepSpeedConfig

from step3vl_train.model import Step3VLConfig, Step3VLForConditionalGeneration
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


def build_engine(model_config: Step3VLConfig, optim: OptimConfig, ds_config: dict[str, Any]) -> Engine:
    """Builds the model partitioned from the start (transformers' zero.Init path, which also gathers each
    module to initialise it), then DeepSpeed around it. Call after torch.distributed is initialised."""
    hf_deepspeed_config = HfDeepSpeedConfig(ds_config)
    dtype = torch.bfloat16 if ds_config.get("bf16", {}).get("enabled") else torch.float32
    model = Step3VLForConditionalGeneration._from_config(model_config, dtype=dtype)
    optimizer = build_optimizer(build_param_groups(model, optim), optim)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
    return Engine(engine, model, hf_deepspeed_config)
