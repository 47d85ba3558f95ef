"""The PE-lang vision trunk and the two stride-2 downsamplers (spec sections 2.1 and 2.2).

Module and parameter names are the released checkpoint's (`vision_model.*`), so a released state dict
loads without renaming. RoPE is PE's original interleaved 2-D form, applied to the whole head.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from step3vl_train.model.config import Step3VLVisionConfig


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(1.702 * x)


def rotate_half_interleaved(x: torch.Tensor) -> torch.Tensor:
    """(x0, x1, x2, x3, ...) -> (-x1, x0, -x3, x2, ...): rotation of adjacent pairs (GPT-J style)."""
    pairs = x.unflatten(-1, (-1, 2))
    return torch.stack((-pairs[..., 1], pairs[..., 0]), dim=-1).flatten(-2)


def rope2d_angles(
    grid_h: int, grid_w: int, head_dim: int, theta: float, device: torch.device, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """PE's 2-D RoPE angles, (grid_h * grid_w, head_dim), row-major over the grid: the first half of a
    head rotates with the column, the second half with the row, each adjacent pair sharing one frequency."""
    axis_dim = head_dim // 2
    exponents = torch.arange(0, axis_dim, 2, device=device, dtype=dtype)[: axis_dim // 2] / axis_dim
    inv_freq = 1.0 / (theta**exponents)

    def axis(n: int) -> torch.Tensor:
        return torch.outer(torch.arange(n, device=device, dtype=dtype), inv_freq).repeat_interleave(2, -1)

    cols = axis(grid_w)[None, :, :].expand(grid_h, grid_w, -1)
    rows = axis(grid_h)[:, None, :].expand(grid_h, grid_w, -1)
    return torch.cat([cols, rows], dim=-1).reshape(grid_h * grid_w, head_dim)


def apply_rope(x: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    """Rotates x (..., N, head_dim) by angles (N, head_dim) in fp32, returning x's dtype (as PE does)."""
    rotated = x * angles.cos() + rotate_half_interleaved(x) * angles.sin()
    return rotated.to(x.dtype)


class VisionAttention(nn.Module):
    """Bidirectional attention with a fused q|k|v projection (`in_proj_weight`, as nn.MultiheadAttention names it)."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.empty(3 * width))
        self.out_proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
        """x: (B, N, width); angles: (N, head_dim) -> (B, N, width)."""
        q, k, v = F.linear(x, self.in_proj_weight, self.in_proj_bias).chunk(3, dim=-1)
        q, k, v = (t.unflatten(-1, (self.heads, -1)).transpose(1, 2) for t in (q, k, v))
        q, k = apply_rope(q, angles), apply_rope(k, angles)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.out_proj(out.transpose(1, 2).flatten(2))


class VisionMLP(nn.Module):
    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.c_fc = nn.Linear(width, hidden)
        self.c_proj = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(quick_gelu(self.c_fc(x)))


class LayerScale(nn.Module):
    def __init__(self, width: int, init_value: float):
        super().__init__()
        self.init_value = init_value
        self.gamma = nn.Parameter(torch.full((width,), init_value))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class ResidualAttentionBlock(nn.Module):
    """Pre-norm block. The tower checkpoints its blocks itself (`StepVisionEncoder.forward`), and only when
    its caller does not checkpoint the whole call: a block inside both would run forward three times."""

    def __init__(self, config: Step3VLVisionConfig):
        super().__init__()
        width, eps = config.width, config.layer_norm_eps
        self.ln_1 = nn.LayerNorm(width, eps=eps)
        self.attn = VisionAttention(width, config.heads)
        self.ls_1 = LayerScale(width, config.ls_init_value) if config.ls_init_value is not None else nn.Identity()
        self.ln_2 = nn.LayerNorm(width, eps=eps)
        self.mlp = VisionMLP(width, config.mlp_width)
        self.ls_2 = LayerScale(width, config.ls_init_value) if config.ls_init_value is not None else nn.Identity()

    def forward(self, x: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
        x = x + self.ls_1(self.attn(self.ln_1(x), angles))
        return x + self.ls_2(self.mlp(self.ln_2(x)))


class VisionTransformer(nn.Module):
    def __init__(self, config: Step3VLVisionConfig):
        super().__init__()
        self.resblocks = nn.ModuleList(ResidualAttentionBlock(config) for _ in range(config.layers))


class StepVisionEncoder(nn.Module):
    """PE-lang trunk (no CLS, no ln_post, no pooling) with `vit_downsampler1/2` living beside it, as released."""

    def __init__(self, config: Step3VLVisionConfig):
        super().__init__()
        self.config = config
        width = config.width
        self.conv1 = nn.Conv2d(3, width, kernel_size=config.patch_size, stride=config.patch_size, bias=False)
        self.positional_embedding = nn.Parameter(torch.empty(config.grid_size**2, width))
        self.ln_pre = nn.LayerNorm(width, eps=config.layer_norm_eps) if config.use_ln_pre else nn.Identity()
        self.transformer = VisionTransformer(config)
        self.vit_downsampler1 = nn.Conv2d(width, 2 * width, kernel_size=3, stride=2, padding=1)
        self.vit_downsampler2 = nn.Conv2d(2 * width, 4 * width, kernel_size=3, stride=2, padding=1)

    def position_table(self, grid_h: int, grid_w: int) -> torch.Tensor:
        """The learned (grid, grid) table, bilinearly resized for other grids: (grid_h * grid_w, width)."""
        table = self.positional_embedding
        grid = self.config.grid_size
        if (grid_h, grid_w) == (grid, grid):
            return table
        table = table.reshape(1, grid, grid, -1).permute(0, 3, 1, 2)
        table = F.interpolate(table, size=(grid_h, grid_w), mode="bilinear", align_corners=False)
        return table.permute(0, 2, 3, 1).reshape(grid_h * grid_w, -1)

    def forward(self, pixel_values: torch.Tensor, checkpoint_blocks: bool = False) -> torch.Tensor:
        """Trunk features. pixel_values: (B, 3, H, W), H and W multiples of patch_size -> (B, H/14 * W/14, width).
        checkpoint_blocks: keep only each block's input, recomputing the block in backward."""
        # The dtype comes from this module's own parameter, gathered for its forward under ZeRO-3; reading
        # conv1.weight here would be an extra all-gather before conv1 runs.
        x = self.conv1(pixel_values.to(self.positional_embedding.dtype))
        grid_h, grid_w = x.shape[-2:]
        x = x.flatten(2).transpose(1, 2)
        x = self.ln_pre(x + self.position_table(grid_h, grid_w))
        # fp32 angles at lower precisions, as PE computes them.
        angle_dtype = torch.promote_types(x.dtype, torch.float32)
        head_dim = self.config.width // self.config.heads
        angles = rope2d_angles(grid_h, grid_w, head_dim, self.config.rope_theta, x.device, angle_dtype)
        for block in self.transformer.resblocks:
            x = checkpoint(block, x, angles, use_reentrant=False) if checkpoint_blocks else block(x, angles)
        return x

    def downsample(self, features: torch.Tensor) -> torch.Tensor:
        """Square grid features (B, P, width) -> (B, P/16, 4 * width), no activation between the convs."""
        batch, tokens, width = features.shape
        side = int(tokens**0.5)
        if side * side != tokens:
            raise ValueError(f"vision features hold {tokens} tokens; the downsampler needs a square grid")
        x = features.transpose(1, 2).reshape(batch, width, side, side)
        x = self.vit_downsampler2(self.vit_downsampler1(x))
        return x.flatten(2).transpose(1, 2)
