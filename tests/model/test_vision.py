"""The vision tower and projector against an independent re-implementation of the released computation
(spec sections 2.1-2.2), written from the spec with different primitives (complex-number RoPE, explicit
softmax attention), run in float64 on random weights in the released layout."""

import math

import pytest
import torch
import torch.nn.functional as F

from step3vl_train.model.counting import build_on_meta
from step3vl_train.model.vision import rope2d_angles, rotate_half_interleaved
from tests.conftest import load_model_config


def reference_image_tokens(sd: dict, vision_cfg, pixels: torch.Tensor) -> torch.Tensor:
    w = lambda name: sd[f"vision_model.{name}"]  # noqa: E731
    width, heads, eps = vision_cfg.width, vision_cfg.heads, vision_cfg.layer_norm_eps
    head_dim = width // heads
    x = F.conv2d(pixels, w("conv1.weight"), stride=vision_cfg.patch_size)
    batch, _, gh, gw = x.shape
    x = x.reshape(batch, width, gh * gw).permute(0, 2, 1)
    table = w("positional_embedding")
    g = math.isqrt(table.shape[0])
    if (gh, gw) != (g, g):
        table = F.interpolate(table.T.reshape(1, width, g, g), size=(gh, gw), mode="bilinear", align_corners=False)
        table = table.reshape(width, gh * gw).T
    x = F.layer_norm(x + table, (width,), w("ln_pre.weight"), w("ln_pre.bias"), eps)

    # RoPE as complex rotation of adjacent pairs: pairs 0..d/4-1 by column, the rest by row.
    quarter = head_dim // 4
    inv_freq = 1.0 / (vision_cfg.rope_theta ** (torch.arange(quarter, dtype=torch.float64) * 2 / (head_dim // 2)))
    rows, cols = torch.meshgrid(torch.arange(gh), torch.arange(gw), indexing="ij")
    angle = torch.cat([cols.reshape(-1, 1) * inv_freq, rows.reshape(-1, 1) * inv_freq], dim=-1)
    rotation = torch.polar(torch.ones_like(angle), angle)

    def rope(t):
        pairs = torch.view_as_complex(t.reshape(*t.shape[:-1], head_dim // 2, 2).contiguous())
        return torch.view_as_real(pairs * rotation).flatten(-2)

    for i in range(vision_cfg.layers):
        b = lambda name, i=i: w(f"transformer.resblocks.{i}.{name}")  # noqa: E731
        h = F.layer_norm(x, (width,), b("ln_1.weight"), b("ln_1.bias"), eps)
        qkv = h @ b("attn.in_proj_weight").T + b("attn.in_proj_bias")
        q, k, v = (
            qkv[..., j * width : (j + 1) * width].reshape(batch, -1, heads, head_dim).transpose(1, 2) for j in range(3)
        )
        scores = rope(q) @ rope(k).transpose(-1, -2) / math.sqrt(head_dim)
        attn = (scores.softmax(-1) @ v).transpose(1, 2).reshape(batch, -1, width)
        x = x + b("ls_1.gamma") * (attn @ b("attn.out_proj.weight").T + b("attn.out_proj.bias"))
        h = F.layer_norm(x, (width,), b("ln_2.weight"), b("ln_2.bias"), eps)
        h = h @ b("mlp.c_fc.weight").T + b("mlp.c_fc.bias")
        h = h * torch.sigmoid(1.702 * h)
        x = x + b("ls_2.gamma") * (h @ b("mlp.c_proj.weight").T + b("mlp.c_proj.bias"))

    grid = x.permute(0, 2, 1).reshape(batch, width, gh, gw)
    grid = F.conv2d(grid, w("vit_downsampler1.weight"), w("vit_downsampler1.bias"), stride=2, padding=1)
    grid = F.conv2d(grid, w("vit_downsampler2.weight"), w("vit_downsampler2.bias"), stride=2, padding=1)
    return grid.flatten(2).transpose(1, 2) @ sd["vit_large_projector.weight"].T


def randomise(model):
    """Non-trivial values everywhere (LayerScale, norms, biases), so no term can hide behind an init."""
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0, 0.2)


@pytest.mark.parametrize("side, tokens", [(224, 16), (168, 9)])
def test_matches_reference_implementation(tiny_model, side, tokens):
    model = tiny_model.double()
    randomise(model)
    pixels = torch.randn(2, 3, side, side, dtype=torch.float64)
    ours = model.encode_images(pixels)
    reference = reference_image_tokens(model.state_dict(), model.config.vision_config, pixels)
    assert ours.shape == (2, tokens, model.config.hidden_size)
    torch.testing.assert_close(ours, reference, rtol=1e-9, atol=1e-9)


def test_released_shapes_on_meta():
    model = build_on_meta(load_model_config("step3vl_10b"))
    assert model.encode_images(torch.empty(1, 3, 728, 728, device="meta")).shape == (1, 169, 4096)
    assert model.encode_images(torch.empty(3, 3, 504, 504, device="meta")).shape == (3, 81, 4096)
    assert model.vision_model(torch.empty(1, 3, 728, 728, device="meta")).shape == (1, 2704, 1536)


def test_rope_layout():
    angles = rope2d_angles(3, 5, head_dim=8, theta=10000.0, device=torch.device("cpu"))
    inv_freq = torch.tensor([1.0, 0.01])  # 1 / 10000^(2i/4) for i = 0, 1
    row, col = 2, 3
    expected = torch.cat([(col * inv_freq).repeat_interleave(2), (row * inv_freq).repeat_interleave(2)])
    torch.testing.assert_close(angles[row * 5 + col], expected)


def test_rotate_half_is_interleaved():
    x = torch.tensor([1.0, 2.0, 3.0, 4.0])
    assert rotate_half_interleaved(x).tolist() == [-2.0, 1.0, -4.0, 3.0]


def test_position_table_native_grid_is_used_unchanged(tiny_model):
    encoder = tiny_model.vision_model
    grid = encoder.config.grid_size
    assert encoder.position_table(grid, grid) is encoder.positional_embedding
    assert encoder.position_table(12, 12).shape == (144, encoder.config.width)


def test_downsampler_rejects_non_square_grid(tiny_model):
    with pytest.raises(ValueError, match="square"):
        tiny_model.vision_model.downsample(torch.zeros(1, 12, tiny_model.config.vision_config.width))
