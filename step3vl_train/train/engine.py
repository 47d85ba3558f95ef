"""The model under DeepSpeed ZeRO-3: built already partitioned, wrapped with our AdamW param groups."""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import deepspeed
import torch
from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus
from transformers.integrations import HfDeepSpeedConfig

from step3vl_train.model import Step3VLConfig, Step3VLForConditionalGeneration
from step3vl_train.model.checkpoint import check_state_dict, read_released_tensors
from step3vl_train.model.compute import ComputeConfig, ModelRuntime, resolve_attention
from step3vl_train.model.value import CRITIC_ONLY, POLICY_ONLY, Step3VLForValue
from step3vl_train.train.config import OptimConfig
from step3vl_train.train.optim import build_optimizer, build_param_groups
from step3vl_train.train.sequence_parallel import init_sequence_parallel
from step3vl_train.usage import UsageError


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
    shared_prompts: bool = False,
) -> Engine:
    """Builds the model partitioned from the start (transformers' zero.Init path, which also gathers each
    module to initialise it), loads `init_from` (a released-format directory) if given, then wraps it in
    DeepSpeed. The weights must be in place before `deepspeed.initialize`, which takes its fp32 master
    copies from them. Parameters whose names start with a prefix in `freeze` are not trained.

    `compute` picks the attention kernel for this device and the chunk sizes; `sequence_parallel` > 1
    wraps the kernel in DeepSpeed's Ulysses attention, consecutive ranks sharing one packed row;
    `shared_prompts` takes a kernel that reads RL's shared-prompt rows (model/attention.py). The image
    path and the head are kept whole on every rank (`keep_whole`). Call after torch.distributed is
    initialised."""
    compute = compute or ComputeConfig()
    check_gradient_reduce(ds_config.get("zero_optimization", {}), sequence_parallel)
    device_type = "cuda" if torch.cuda.is_available() else "cpu"
    kernel = resolve_attention(compute.attention, device_type, sequence_parallel, shared_prompts)
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
    keep_whole(engine, model.kept_whole())
    return Engine(engine, model, hf_deepspeed_config)


def check_gradient_reduce(zero: dict[str, Any], sequence_parallel: int) -> None:
    """Refuses the ZeRO-3 reduce settings whose gradients would be wrong. DeepSpeed 0.19 averages each
    gradient over the ranks in one of two ways: a reduce-scatter dividing by the world size, or, with
    `reduce_scatter: false` and `contiguous_gradients: true`, an all-reduce dividing by world /
    sequence-parallel degree, except for a tensor larger than `reduce_bucket_size` (the head, the
    embeddings), which still goes the first way. Under sequence parallelism the two disagree by that
    degree, so one step would scale some gradients by it and not others: no loss scaling can be right
    for both. The trainer scales its loss for the first way (train/trainer.py)."""
    if sequence_parallel > 1 and zero.get("reduce_scatter", True) is False and zero.get("contiguous_gradients", True):
        raise UsageError(
            f"deepspeed.zero_optimization.reduce_scatter=false with contiguous_gradients=true and "
            f"trainer.sequence_parallel={sequence_parallel}: DeepSpeed would average some gradients over "
            f"{sequence_parallel}x fewer ranks than others. Keep reduce_scatter=true (the default), or set "
            "contiguous_gradients=false as well"
        )


def scale_gradients(engine: deepspeed.DeepSpeedEngine, factor: torch.Tensor) -> None:
    """Multiplies what this optimizer step's micro-steps have accumulated (ZeRO-3's fp32 gradient
    partitions, already reduced over the ranks) by `factor`, a scalar tensor on the engine's device;
    `engine.step()` then takes the norm, clips and updates from the scaled gradients."""
    optimizer = engine.optimizer
    if optimizer.offload_optimizer:
        raise UsageError("zero_optimization.offload_optimizer is not supported: its gradients are kept elsewhere")
    optimizer.grad_partitions_flat_buffer.mul_(factor)


def keep_whole(engine: deepspeed.DeepSpeedEngine, modules: list[torch.nn.Module]) -> None:
    """ZeRO-3 gathers a module's weights each time it is called, and records the order of the calls in a
    micro-step's forward and backward to prefetch the next module's while one computes. `modules` are
    called a number of times that changes from one micro-step to the next (the vision tower once a chunk
    of a rank's views, or not at all; the head once a tile of scored positions), and each change throws
    the recorded order away ("Invalidate trace cache"), after which nothing is prefetched.

    Their weights are therefore kept whole on every rank, as DeepSpeed keeps its small tensors
    (`ds_persist`), never gathered when called; and their ZeRO-3 hooks are removed, so that their calls
    are no part of the recorded order, which then holds the decoder's modules alone, the same every
    micro-step. Their gradients are reduced as before (those hooks are the parameters', not the
    modules'). DeepSpeed partitions every parameter when it updates them and when it saves or loads a
    checkpoint, and gathers its small tensors again after, one collective a tensor: those and these are
    gathered then in one collective for all of them. The cost is their size in the training dtype
    on every rank: 4.85 GiB for STEP3-VL-10B's tower, projector and head (launch/estimate_memory.py).
    Read them with `gathered_parameters`, not GatheredParameters, which partitions what it leaves and
    would leave them partitioned with nothing to gather them again."""
    optimizer = engine.optimizer
    persistent = optimizer.persistent_parameters  # the list DeepSpeed gathers after each step (and on load)
    ids = {id(param) for param in persistent}
    params = [*persistent, *(p for module in modules for p in module.parameters() if id(p) not in ids)]
    persistent.clear()  # all of them in one collective, here
    for param in params:
        param.ds_persist = True

    def gather() -> None:
        partitioned = [param for param in params if param.ds_status == ZeroParamStatus.NOT_AVAILABLE]
        if partitioned:
            partitioned[0].all_gather_coalesced(partitioned).wait()

    gather()
    for method in ("_post_step", "checkpoint_event_epilogue"):  # after an update; after a save or a load
        _run_after(optimizer, method, gather)
    owned = {id(hooks) for module in modules for sub in module.modules() for hooks in _hook_dicts(sub)}
    offload = optimizer.parameter_offload
    for handles in (offload.forward_hooks, offload.backward_hooks):
        ours = [handle for handle in handles if id(handle.hooks_dict_ref()) in owned]
        for handle in ours:
            handle.remove()
        handles[:] = [handle for handle in handles if handle not in ours]


def _run_after(instance: object, method: str, then: Callable[[], None]) -> None:
    """`instance.method(...)` followed by `then()`, for this instance."""
    original = getattr(instance, method)

    def method_then(*args, **kwargs):
        result = original(*args, **kwargs)
        then()
        return result

    setattr(instance, method, method_then)


def _hook_dicts(module: torch.nn.Module) -> tuple[dict, ...]:
    return module._forward_pre_hooks, module._forward_hooks


@contextmanager
def gathered_parameters(params: list[torch.nn.Parameter], modifier_rank: int | None = None) -> Iterator[None]:
    """deepspeed.zero.GatheredParameters over those of `params` that ZeRO-3 holds partitioned; the ones
    it keeps whole (`keep_whole`, and DeepSpeed's own small tensors) are read as they are. A collective."""
    partitioned = [param for param in params if getattr(param, "ds_status", None) == ZeroParamStatus.NOT_AVAILABLE]
    with deepspeed.zero.GatheredParameters(partitioned, modifier_rank=modifier_rank):
        yield


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
