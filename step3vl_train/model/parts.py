"""Initialising STEP3-VL from its parts, as pre-training starts: the decoder from a Qwen3 checkpoint
(transformers layout) and the vision trunk from a PE-lang checkpoint (Meta's perception_models naming).
The downsamplers and `vit_large_projector` keep their fresh initialisation."""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from transformers import Qwen3ForCausalLM

from step3vl_train.model.checkpoint import check_state_dict
from step3vl_train.model.step3vl import Step3VLForConditionalGeneration

# Decoder shape fields that must agree between the Qwen3 checkpoint and our text_config.
_DECODER_SHAPE_FIELDS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
)
# Wrappers perception_models' own loader strips (`load_ckpt`): a training-state dict and DDP/CLIP prefixes.
_PE_CONTAINER_KEYS = ("state_dict", "weights")
_PE_PREFIXES = ("module.", "visual.")


@torch.no_grad()
def load_decoder_from_qwen3(model: Step3VLForConditionalGeneration, qwen3_dir: str | os.PathLike) -> None:
    """Copies `model.*` and `lm_head` from a Qwen3ForCausalLM checkpoint directory (a tied source
    embedding becomes the untied head's starting value)."""
    source = Qwen3ForCausalLM.from_pretrained(qwen3_dir, dtype=model.lm_head.weight.dtype)
    ours, theirs = model.config.text_config, source.config
    differ = [
        f"{f}: {getattr(theirs, f)} vs ours {getattr(ours, f)}"
        for f in _DECODER_SHAPE_FIELDS
        if getattr(theirs, f) != getattr(ours, f)
    ]
    if differ:
        raise ValueError(f"{qwen3_dir}: Qwen3 checkpoint does not fit text_config ({'; '.join(differ)})")
    model.model.load_state_dict(source.model.state_dict(), strict=True)
    model.lm_head.weight.copy_(source.lm_head.weight)


def read_pe_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A PE checkpoint file (`.pt`/`.pth` torch pickle, loaded weights-only, or `.safetensors`) as trunk
    tensors under Meta's names (`conv1.weight`, `transformer.resblocks.0.attn.in_proj_weight`, ...)."""
    path = Path(path)
    if path.suffix == ".safetensors":
        state = load_file(path)
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
    for key in _PE_CONTAINER_KEYS:
        if isinstance(state.get(key), dict):
            state = state[key]
    for prefix in _PE_PREFIXES:
        if any(k.startswith(prefix) for k in state):
            state = {k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)}
    return state


def resize_position_table(table: torch.Tensor, grid: int) -> torch.Tensor:
    """(g*g, C) learned positions, without a CLS row, bilinearly resized to (grid*grid, C) the way the
    encoder samples it at run time."""
    side = int(table.shape[0] ** 0.5)
    if side * side != table.shape[0]:
        raise ValueError(f"position table of {table.shape[0]} rows is not a square grid")
    if side == grid:
        return table
    square = table.reshape(1, side, side, -1).permute(0, 3, 1, 2).float()
    resized = F.interpolate(square, size=(grid, grid), mode="bilinear", align_corners=False)
    return resized.permute(0, 2, 3, 1).reshape(grid * grid, -1).to(table.dtype)


@torch.no_grad()
def load_vision_from_pe(model: Step3VLForConditionalGeneration, pe_path: str | os.PathLike) -> None:
    """Loads the PE-lang trunk into `vision_model`, resizing its position table to the config's grid
    (448-px PE-lang 32x32 -> 52x52 for 728 px). Any other missing or extra tensor is an error."""
    state = read_pe_state_dict(pe_path)
    if "positional_embedding" in state:
        state["positional_embedding"] = resize_position_table(
            state["positional_embedding"], model.config.vision_config.grid_size
        )
    trunk = {k: v.shape for k, v in model.vision_model.state_dict().items() if not k.startswith("vit_downsampler")}
    check_state_dict(trunk, {k: v.shape for k, v in state.items()}, f"{pe_path} (PE-lang trunk)")
    model.vision_model.load_state_dict(state, strict=False)
