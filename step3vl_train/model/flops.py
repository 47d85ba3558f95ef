"""Training FLOPs of a batch, the vision tower's apart from the decoder's, for MFU.

Counted as 3x the forward matmuls (forward, and backward for activations and weights): 6 FLOPs per
weight per position it is applied at, plus attention's two matmuls. The ViT attends over all patches of
a view; the decoder attends causally within each packed sample, about half of the full square.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from step3vl_train.model.config import Step3VLConfig


@dataclass
class StepFlops:
    vit: float  # vision tower, downsamplers and projector
    decoder: float

    @property
    def total(self) -> float:
        return self.vit + self.decoder


# Dense bf16 peak FLOP/s by device name, for MFU.
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}


def device_peak_flops() -> float | None:
    """The current CUDA device's dense bf16 peak, or None where it is unknown (or on the CPU)."""
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    return next((peak for key, peak in PEAK_BF16_FLOPS.items() if key in name), None)


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


def decoder_flops(config: Step3VLConfig, sample_lengths: list[int], causal: bool = True) -> float:
    """Training FLOPs of the decoder (with the LM head) over packed samples of these lengths."""
    text = config.text_config
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    q, kv = text.num_attention_heads * head_dim, text.num_key_value_heads * head_dim
    per_layer = text.hidden_size * (2 * q + 2 * kv) + 3 * text.hidden_size * text.intermediate_size
    matmul = (text.num_hidden_layers * per_layer + text.hidden_size * text.vocab_size) * sum(sample_lengths)
    squares = sum(length * length for length in sample_lengths) * (0.5 if causal else 1.0)
    attention = text.num_hidden_layers * 2 * squares * q
    return 3 * 2 * (matmul + attention)


def batch_flops(
    config: Step3VLConfig,
    input_ids: torch.Tensor,
    position_ids: torch.Tensor | None,
    attention_mask: torch.Tensor,
    view_sides: list[int],
) -> StepFlops:
    """FLOPs of one micro-batch: sample lengths from restarting position ids (packed) or the mask."""
    if position_ids is not None:
        starts = position_ids == 0
        lengths = []
        for row_starts, row_mask in zip(starts, attention_mask, strict=True):
            real = int(row_mask.sum())  # padding sits after the real tokens
            edges = [start for start in row_starts.nonzero().flatten().tolist() if start < real] + [real]
            lengths += [b - a for a, b in zip(edges, edges[1:], strict=False)]
    else:
        lengths = attention_mask.sum(dim=1).tolist()
    return StepFlops(sum(vit_flops(config, side) for side in view_sides), decoder_flops(config, lengths))
