"""Training FLOPs of a batch, the vision tower's apart from the decoder's, for MFU: what the model
computes for the user, never a recomputation (checkpointed layers, the head's tiles in backward).

Counted as 3x the forward matmuls (forward, and backward for activations and weights): 6 FLOPs per
weight per position it is applied at, plus attention's two matmuls. The decoder's layers run at every
token; the language-model head (hidden x vocabulary) only at the positions with a target, which is all
the model runs it on (model/step3vl.py: the loss, RL's log-probs). So a micro-batch's decoder FLOPs are

    6 * (layers * layer_weights * tokens + hidden * vocab * scored) + attention,
    attention = 3 * 2 * layers * 2 * q * sum over samples of (length^2 / 2)      (causal: `decoder`)
              = 3 * 2 * layers * 2 * q * sum over rows of (length^2)           (`decoder_dense`)

with layer_weights = hidden * (2 q + 2 kv) + 3 * hidden * intermediate. The ViT attends over all patches
of a view. The causal count is the work a step needs; published MFU figures (torchtitan, OLMo-core)
count the attention as the full square of the whole row: `decoder_dense`, which the trainer's `mfu`
uses so that it compares with theirs (`mfu/causal` is ours).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from step3vl_train.model.config import Step3VLConfig


@dataclass
class StepFlops:
    vit: float  # vision tower, downsamplers and projector
    decoder: float  # causal attention within each packed sample
    decoder_dense: float = 0.0  # full attention over each whole row, as torchtitan counts

    @property
    def total(self) -> float:
        return self.vit + self.decoder


# Dense bf16 peak FLOP/s by the exact name CUDA reports (NVIDIA's datasheets, half the sparse figure). The
# form factors differ: an H100 PCIe or NVL card is not an SXM one.
PEAK_BF16_FLOPS = {
    "NVIDIA H100 80GB HBM3": 989e12,  # SXM5
    "NVIDIA H100 PCIe": 756e12,
    "NVIDIA H100 NVL": 835e12,
    "NVIDIA H200": 989e12,  # SXM
    "NVIDIA H200 NVL": 835e12,
    "NVIDIA A100-SXM4-80GB": 312e12,
    "NVIDIA A100-SXM4-40GB": 312e12,
    "NVIDIA A100 80GB PCIe": 312e12,
    "NVIDIA A100-PCIE-40GB": 312e12,
}


def device_peak_flops() -> float | None:
    """The current CUDA device's dense bf16 peak, or None where its name is not in the table (or on the
    CPU): set trainer.peak_flops_per_device for MFU there."""
    if not torch.cuda.is_available():
        return None
    return PEAK_BF16_FLOPS.get(torch.cuda.get_device_name())


def vit_flops(config: Step3VLConfig, side: int, views: int = 1) -> float:
    """Training FLOPs of `views` square views of `side` pixels through the tower, downsamplers and projector."""
    vision = config.vision_config
    width, patches = vision.width, (side // vision.patch_size) ** 2
    mlp = int(width * vision.mlp_ratio)
    per_block = 4 * width * width + 2 * width * mlp  # in_proj (3w x w) + out_proj, c_fc + c_proj
    matmul = 3 * vision.patch_size**2 * width * patches + vision.layers * per_block * patches
    merged = math.ceil(side / (vision.patch_size * 2)) ** 2  # after the first stride-2 conv
    tokens = math.ceil(side / (vision.patch_size * 4)) ** 2
    matmul += 9 * width * 2 * width * merged + 9 * 2 * width * 4 * width * tokens  # 3x3 convs
    matmul += 4 * width * config.hidden_size * tokens  # projector
    attention = vision.layers * 2 * patches * patches * width  # QK^T and AV, full
    return views * 3 * 2 * (matmul + attention)


def decoder_flops(
    config: Step3VLConfig, sample_lengths: list[int], scored: int, causal: bool = True, head_width: int | None = None
) -> float:
    """Training FLOPs of the decoder over packed samples of these lengths, with its head (`head_width`
    outputs, the vocabulary by default) at `scored` positions."""
    text = config.text_config
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    q, kv = text.num_attention_heads * head_dim, text.num_key_value_heads * head_dim
    per_layer = text.hidden_size * (2 * q + 2 * kv) + 3 * text.hidden_size * text.intermediate_size
    head = text.hidden_size * (head_width if head_width is not None else text.vocab_size)
    matmul = text.num_hidden_layers * per_layer * sum(sample_lengths) + head * scored
    squares = sum(length * length for length in sample_lengths) * (0.5 if causal else 1.0)
    attention = text.num_hidden_layers * 2 * squares * q
    return 3 * 2 * (matmul + attention)


def batch_flops(
    config: Step3VLConfig,
    input_ids: torch.Tensor,
    position_ids: torch.Tensor | None,
    attention_mask: torch.Tensor,
    view_sides: list[int],
    scored: int,
    head_width: int | None = None,
) -> StepFlops:
    """FLOPs of one micro-batch: sample lengths from restarting position ids (packed) or the mask; the
    head at `scored` positions."""
    rows = attention_mask.sum(dim=1).tolist()  # padding sits after the real tokens
    if position_ids is not None:
        lengths = []
        for row_starts, real in zip(position_ids == 0, rows, strict=True):
            edges = [start for start in row_starts.nonzero().flatten().tolist() if start < real] + [real]
            lengths += [b - a for a, b in zip(edges, edges[1:], strict=False)]
    else:
        lengths = rows
    return StepFlops(
        sum(vit_flops(config, side) for side in view_sides),
        decoder_flops(config, lengths, scored, head_width=head_width),
        decoder_flops(config, rows, scored, causal=False, head_width=head_width),
    )
