"""How the model computes at long lengths, and which ranks must compute alike: the dataclass behind
`configs/compute/*.yaml`, the attention kernel choice, and the per-process runtime the model reads.

None of these settings changes a result (the tests hold chunked and unchunked, flattened and padded,
sequence-parallel and not, to the same numbers); they change memory, speed and what runs where.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

# `sdpa_packed` (the CPU's) and `flex_packed` (GPUs') find packed samples, and shared prompts, in the
# position ids (attention.py).
ATTENTION_KERNELS = (
    "auto", "sdpa", "flash_attention_2", "flash_attention_3", "flex_attention", "sdpa_packed", "flex_packed",
)  # fmt: skip
PACKED_KERNELS = ("sdpa_packed", "flex_packed")
# Kernels that take packed rows as one flattened row and find the samples from the position ids
# (transformers' flash-attention path detects packing only at batch size 1).
VARLEN_KERNELS = ("flash_attention_2", "flash_attention_3")
# How a checkpointed vision tower keeps what its backward needs: each block's input for every call
# ("blocks"), or only each call's output, the call recomputed whole in backward ("calls").
VISION_CHECKPOINTS = ("blocks", "calls")


class AttentionChoiceError(ValueError):
    """An attention kernel that cannot run, or cannot keep packed samples apart, in this setting."""


@dataclass
class ComputeConfig:
    """configs/compute/default.yaml."""

    attention: str = "auto"  # auto: flash_attention_2 with flash-attn on CUDA, else flex_attention; sdpa on the CPU
    vision_chunk: int = 8  # views per vision-tower call (0: all at once)
    # With gradient checkpointing, each block runs forward twice either way (the forward and one recompute):
    # "blocks" keeps every call's block inputs (layers x patches x width a view); "calls" keeps each call's
    # output tokens and, while one call is recomputed in backward, that call's every activation.
    vision_checkpoint: str = "blocks"
    loss_chunk: int = 2048  # positions per lm_head tile for the loss and RL log-probs (0: all at once)

    def __post_init__(self) -> None:
        if self.attention not in ATTENTION_KERNELS:
            raise ValueError(f"compute.attention must be one of {ATTENTION_KERNELS}, not {self.attention!r}")
        if self.vision_checkpoint not in VISION_CHECKPOINTS:
            raise ValueError(
                f"compute.vision_checkpoint must be one of {VISION_CHECKPOINTS}, not {self.vision_checkpoint!r}"
            )
        if self.vision_chunk < 0 or self.loss_chunk < 0:
            raise ValueError("compute.vision_chunk and compute.loss_chunk must be >= 0")


def resolve_attention(
    requested: str, device_type: str, sequence_parallel: int = 1, shared_prompts: bool = False
) -> str:
    """The kernel for training rows on `device_type` ("cuda" or "cpu"). `shared_prompts`: rows that hold a
    prompt once and its responses after it (RL's algo.shared_prompt), which only the packed kernels read.
    Raises AttentionChoiceError for one that would materialise an (L x L) mask on a GPU, let packed samples
    see each other, or is not installed."""
    kernel = requested
    if requested == "auto":
        if device_type != "cuda":
            kernel = "sdpa_packed" if sequence_parallel > 1 or shared_prompts else "sdpa"
        elif shared_prompts or (sequence_parallel > 1 and not _flash_attn_installed()):
            kernel = "flex_packed"
        else:
            kernel = "flash_attention_2" if _flash_attn_installed() else "flex_attention"
    if device_type == "cuda" and kernel in ("sdpa", "sdpa_packed"):
        raise AttentionChoiceError(
            f"compute.attention={kernel} builds an (L x L) mask for packed and padded rows (16 GiB at 128K tokens), "
            "which GPUs cannot afford at the paper's lengths: use compute.attention=flash_attention_2 (pip install "
            "flash-attn), flex_packed or flex_attention"
        )
    if device_type != "cuda" and kernel in (*VARLEN_KERNELS, "flex_attention", "flex_packed"):
        raise AttentionChoiceError(f"compute.attention={kernel} is a GPU kernel; on the CPU use sdpa (or auto)")
    if shared_prompts:
        check_shared_prompts(kernel)
    if sequence_parallel > 1 and kernel not in (*VARLEN_KERNELS, *PACKED_KERNELS):
        raise AttentionChoiceError(
            f"sequence_parallel={sequence_parallel} needs a kernel that finds the packed samples in the "
            f"gathered position ids: DeepSpeed's Ulysses drops the {kernel} mask (and rebuilds flex's as plainly "
            "causal), so packed samples would attend to each other. Use compute.attention=flash_attention_2 or "
            "flex_packed on GPUs (sdpa_packed is the CPU reference)"
        )
    if kernel == "flash_attention_2" and not _flash_attn_installed():
        raise AttentionChoiceError("compute.attention=flash_attention_2 needs flash-attn: pip install flash-attn")
    return kernel


def check_shared_prompts(kernel: str) -> None:
    """Refuses a kernel (a requested one: `auto` picks a packed one) that cannot read RL's shared-prompt rows."""
    if kernel not in ("auto", *PACKED_KERNELS):
        raise AttentionChoiceError(
            f"algo.shared_prompt=true lays a group's responses after one copy of its prompt, a mask only "
            f"{' and '.join(PACKED_KERNELS)} read from the position ids, not compute.attention={kernel}: use "
            "compute.attention=auto (flex_packed on GPUs), or algo.shared_prompt=false"
        )


def _flash_attn_installed() -> bool:
    return importlib.util.find_spec("flash_attn") is not None


@dataclass
class ModelRuntime:
    """What a model instance needs to know at run time beyond its weights. The defaults are one process
    with no collectives, as in generation, export and the rollout engine."""

    compute: ComputeConfig = field(default_factory=lambda: ComputeConfig(attention="sdpa"))
    # Ranks whose ZeRO-3 engine reduces gradients together. The image path's and the head's weights are
    # kept whole on every rank (train/engine.py: keep_whole), so a rank may call them as often as its own
    # batch needs; but the gradient reduce runs in buckets that must hold the same parameters on every
    # rank, so either every rank calls the tower (and the projector) in a forward, or none does.
    group: dist.ProcessGroup | None = None
    sequence_group: dist.ProcessGroup | None = None  # Ulysses sequence parallelism: ranks sharing one row

    @property
    def sequence_parallel(self) -> int:
        return dist.get_world_size(self.sequence_group) if self.sequence_group is not None else 1

    @property
    def sequence_rank(self) -> int:
        return dist.get_rank(self.sequence_group) if self.sequence_group is not None else 0

    def flattens_packed_rows(self, attention: str) -> bool:
        return attention in VARLEN_KERNELS

    def agree(self, counts: list[int], device: torch.device) -> list[int]:
        """The largest of each count over `group` (one small all-reduce on `device`; the counts as they
        are without a group)."""
        if self.group is None:
            return counts
        tensor = torch.tensor(counts, dtype=torch.int64, device=device)
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX, group=self.group)
        return tensor.tolist()


def zero_unreached_gradients(params: list[torch.nn.Parameter]) -> None:
    """Zeroes the ZeRO-3 gradient partitions of trainable `params` that no rank reaches in this forward,
    when it is the first micro-step of an optimizer step. DeepSpeed writes a partition only when its
    parameter gets a gradient, and keeps it after the update, so without this the update would reuse the
    last step's gradient (a later micro-step adds to the zeros as usual). Does nothing outside ZeRO-3."""
    for param in params:
        optimizer = getattr(param, "_z3_optimizer", None)  # ZeRO-3's, on the parameters it trains
        if param.requires_grad and optimizer is not None and optimizer.micro_step_id == 0:
            # What deepspeed.utils.safe_set_local_grad calls (importing deepspeed here would tie the model to it).
            optimizer.set_local_grad_for_param(torch.zeros_like(param.ds_tensor), param)
