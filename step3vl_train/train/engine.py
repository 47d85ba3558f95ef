"""The model under DeepSpeed ZeRO-3: built already partitioned, wrapped with our AdamW param groups."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import deepspeed
import torch
from transformers.integrations import HfDeepSpeedConfig

from step3vl_train.model import Step3VLConfig, Step3VLForConditionalGeneration
from step3vl_train.model.checkpoint import check_state_dict, read_released_tensors
from step3vl_train.model.compute import ComputeConfig, ModelRuntime, resolve_attention
from step3vl_train.model.value import CRITIC_ONLY, POLICY_ONLY, Step3VLForValue
from step3vl_train.train.config import OptimConfig
from step3vl_train.train.optim import build_optimizer, build_param_groups
from step3vl_train.train.sequence_parallel import init_sequence_parallel


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
    compute: ComputeConfig | None = None,
    sequence_parallel: int = 1,
) -> Engine:
    """Builds the model partitioned from the start (transformers' zero.Init path, which also gathers each
    module to initialise it), loads `init_from` (a released-format directory) if given, then wraps it in
    DeepSpeed. The weights must be in place before `deepspeed.initialize`, which takes its fp32 master
    copies from them. Parameters whose names start with a prefix in `freeze` are not trained.

    `compute` picks the attention kernel for this device and the chunk sizes; `sequence_parallel` > 1
    wraps the kernel in DeepSpeed's Ulysses attention, consecutive ranks sharing one packed row. Every
    rank makes the same module calls each forward (the model agrees on its call counts over the world).
    Call after torch.distributed is initialised."""
    compute = compute or ComputeConfig()
    device_type = "cuda" if torch.cuda.is_available() else "cpu"
    kernel = resolve_attention(compute.attention, device_type, sequence_parallel)
    hf_deepspeed_config = HfDeepSpeedConfig(ds_config)
    dtype = torch.bfloat16 if ds_config.get("bf16", {}).get("enabled") else torch.float32
    # A copy: the kernel is recorded in the config, and the caller's may build other models.
    model_config = copy.deepcopy(model_config)
    model = model_class._from_config(model_config, dtype=dtype, attn_implementation={"text_config": kernel})
    model.config._attn_implementation = kernel
    if init_from:
        load_released_into(model, init_from)
    if freeze:
        for name, param in model.named_parameters():
            param.requires_grad_(not name.startswith(freeze))
    mpu = init_sequence_parallel(model, sequence_parallel, kernel)
    model.runtime = ModelRuntime(
        compute, torch.distributed.group.WORLD, mpu.get_sequence_parallel_group() if mpu is not None else None
    )
    optimizer = build_optimizer(build_param_groups(model, optim), optim)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config, mpu=mpu)
    gather_when_called(engine, model.image_parameters())
    return Engine(engine, model, hf_deepspeed_config)


def gather_when_called(engine: deepspeed.DeepSpeedEngine, params: list[torch.nn.Parameter]) -> None:
    """ZeRO-3 keeps each tensor under `stage3_param_persistence_threshold` whole on every rank and
    all-gathers it again after every update, one collective a tensor, whether or not the next step calls
    it. `params` are instead gathered with their module when it runs, as larger tensors are: here the image
    path, which a text-only step never calls and which RL (its tower frozen) calls once an iteration.
    DeepSpeed has no setting per parameter, so this undoes its marking once the engine is built."""
    chosen = [param for param in params if getattr(param, "ds_persist", False)]
    if not chosen:
        return
    ids = {id(param) for param in chosen}
    persistent = engine.optimizer.persistent_parameters  # the list gathered after each step (and on load)
    persistent[:] = [param for param in persistent if id(param) not in ids]
    for param in chosen:
        param.ds_persist = False
    chosen[0].partition(param_list=chosen)


def load_released_into(model: Step3VLForConditionalGeneration, directory: str) -> None:
    """Copies a released-format checkpoint into a ZeRO-3 partitioned model: each parameter is gathered,
    rank 0 writes the stored tensor into it, and DeepSpeed partitions it again on leaving the context.
    Names and shapes are checked first, on every rank, so a mismatch fails everywhere at once."""
    tensors = read_released_tensors(directory)  # every rank reads: the check below needs the shapes
    expected = {name: tuple(getattr(param, "ds_shape", param.shape)) for name, param in model.named_parameters()}
    if isinstance(model, Step3VLForValue):
        # From a policy (a critic, or a reward model started from SFT) the value head keeps its init; from
        # a reward model's export, which has a value head and no LM head, the head is loaded too.
        tensors = {name: t for name, t in tensors.items() if not name.startswith(POLICY_ONLY)}
        if not any(name.startswith(CRITIC_ONLY) for name in tensors):
            expected = {name: shape for name, shape in expected.items() if not name.startswith(CRITIC_ONLY)}
    check_state_dict(expected, {name: tuple(t.shape) for name, t in tensors.items()}, directory)
    rank = torch.distributed.get_rank()
    for name, param in model.named_parameters():
        if name not in tensors:
            continue
        with deepspeed.zero.GatheredParameters([param], modifier_rank=0):
            if rank == 0:
                param.data.copy_(tensors[name])
