"""Parameter counts by component, and building the model without allocating weights."""

from __future__ import annotations

import torch
from torch import nn

from step3vl_train.model.config import Step3VLConfig

# Component of each released tensor name, by prefix; the downsamplers count as projector, not encoder.
COMPONENT_PREFIXES = (
    ("projector", ("vision_model.vit_downsampler", "vit_large_projector.")),
    ("vision_encoder", ("vision_model.",)),
    ("decoder", ("model.", "lm_head.")),
)


def component_of(name: str) -> str:
    for component, prefixes in COMPONENT_PREFIXES:
        if name.startswith(prefixes):
            return component
    raise ValueError(f"tensor {name!r} belongs to no component")


def count_parameters(model: nn.Module) -> dict[str, int]:
    """{"vision_encoder": N, "projector": N, "decoder": N, "total": N}; works on the meta device."""
    counts = {component: 0 for component, _ in COMPONENT_PREFIXES}
    for name, param in model.named_parameters():
        counts[component_of(name)] += param.numel()
    return {
        "vision_encoder": counts["vision_encoder"],
        "projector": counts["projector"],
        "decoder": counts["decoder"],
        "total": sum(counts.values()),
    }


def build_on_meta(config: Step3VLConfig) -> nn.Module:
    """The full module tree with shapes but no storage: seconds even at 10B."""
    from step3vl_train.model.step3vl import Step3VLForConditionalGeneration

    with torch.device("meta"):
        return Step3VLForConditionalGeneration(config)
