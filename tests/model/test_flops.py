import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from step3vl_train.model.flops import batch_flops, decoder_flops, device_peak_flops, vit_flops


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
    assert decoder_flops(tiny_model.config, [40], 40, causal=False) == 3 * counter.get_total_flops()


def test_the_head_counts_at_the_scored_positions_only(tiny_config):
    """What the model computes: the head runs on the positions with a target, in SFT 10-16% of them."""
    text = tiny_config.text_config
    head = 6 * text.hidden_size * text.vocab_size
    assert decoder_flops(tiny_config, [40], 40) - decoder_flops(tiny_config, [40], 4) == head * 36
    assert (
        decoder_flops(tiny_config, [40], 40, head_width=1)
        == decoder_flops(tiny_config, [40], 0) + 6 * text.hidden_size * 40
    )


def test_packed_samples_attend_within_themselves(tiny_config):
    positions = torch.tensor([[0, 1, 2, 0, 1, 0, 0, 0]])  # samples of 3 and 2 tokens, then 3 of padding
    mask = torch.tensor([[1, 1, 1, 1, 1, 0, 0, 0]])
    flops = batch_flops(tiny_config, torch.zeros(1, 8), positions, mask, view_sides=[224, 168], scored=3)
    assert flops.decoder == decoder_flops(tiny_config, [3, 2], 3)
    assert flops.decoder < decoder_flops(tiny_config, [5], 3)
    assert flops.vit == vit_flops(tiny_config, 224) + vit_flops(tiny_config, 168)
    padded = batch_flops(tiny_config, torch.zeros(2, 4), None, torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]]), [], 3)
    assert padded.decoder == decoder_flops(tiny_config, [3, 2], 3) and padded.vit == 0


def test_the_dense_count_is_torchtitans_over_whole_rows(tiny_config):
    """6N + 12·L·H·Q·T a token (T the row's real length, N the decoder's weights with the head and without
    the embedding), whatever the samples packed in the row: here every position scored."""
    text = tiny_config.text_config
    positions = torch.tensor([[0, 1, 2, 0, 1, 0, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 0, 0, 0]])
    flops = batch_flops(tiny_config, torch.zeros(1, 8), positions, mask, view_sides=[], scored=5)
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    q, kv = text.num_attention_heads * head_dim, text.num_key_value_heads * head_dim
    layer = text.hidden_size * (2 * q + 2 * kv) + 3 * text.hidden_size * text.intermediate_size
    weights = text.num_hidden_layers * layer + text.hidden_size * text.vocab_size
    per_token = 6 * weights + 12 * text.num_hidden_layers * q * 5
    assert flops.decoder_dense == pytest.approx(5 * per_token)
    assert flops.decoder < flops.decoder_dense


@pytest.mark.parametrize(
    ("name", "peak"),
    [("NVIDIA H100 80GB HBM3", 989e12), ("NVIDIA H100 PCIe", 756e12), ("NVIDIA H100 NVL", 835e12),
     ("NVIDIA H200", 989e12), ("NVIDIA A100-SXM4-80GB", 312e12), ("NVIDIA GeForce RTX 4090", None)],
)  # fmt: skip
def test_the_peak_is_the_exact_models(monkeypatch, name, peak):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *args: name)
    assert device_peak_flops() == peak
