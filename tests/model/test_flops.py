import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from step3vl_train.model.flops import batch_flops, decoder_flops, vit_flops


def explicit_attention(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **_):
    """SDPA as two matmuls, which the flop counter sees on the CPU (its fused kernels it does not)."""
    weights = (q @ k.transpose(-2, -1)) * (scale or q.shape[-1] ** -0.5)
    return weights.softmax(-1) @ v


@pytest.mark.parametrize("side", [224, 168, 56])
def test_vit_flops_match_torchs_flop_counter(tiny_model, monkeypatch, side):
    monkeypatch.setattr(F, "scaled_dot_product_attention", explicit_attention)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        tiny_model.encode_images(torch.zeros(2, 3, side, side))
    assert vit_flops(tiny_model.config, side, views=2) == 3 * counter.get_total_flops()


def test_decoder_flops_match_torchs_flop_counter(tiny_model):
    tiny_model.config._attn_implementation = "eager"  # attention as matmuls the counter sees
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        tiny_model(input_ids=torch.randint(11, 1000, (1, 40)))
    assert decoder_flops(tiny_model.config, [40], causal=False) == 3 * counter.get_total_flops()


def test_packed_samples_attend_within_themselves(tiny_config):
    positions = torch.tensor([[0, 1, 2, 0, 1, 0, 0, 0]])  # samples of 3 and 2 tokens, then 3 of padding
    mask = torch.tensor([[1, 1, 1, 1, 1, 0, 0, 0]])
    flops = batch_flops(tiny_config, torch.zeros(1, 8), positions, mask, view_sides=[224, 168])
    assert flops.decoder == decoder_flops(tiny_config, [3, 2])
    assert flops.decoder < decoder_flops(tiny_config, [5])
    assert flops.vit == vit_flops(tiny_config, 224) + vit_flops(tiny_config, 168)
    padded = batch_flops(tiny_config, torch.zeros(2, 4), None, torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]]), [])
    assert padded.decoder == decoder_flops(tiny_config, [3, 2]) and padded.vit == 0
