"""One Qwen3-8B decoder layer's memory while activation checkpointing recomputes it in backward, traced under
fake tensors (benchmarks/memory_cpu.py trace_decoder_layer): linear in tokens, as flash attention keeps no
(L x L) scores, and what the counted formula says."""

import torch

from benchmarks.memory_cpu import layer_config, trace_decoder_layer
from step3vl_train.train.memory import decoder_layer_bytes


def test_a_layer_recompute_is_linear_in_tokens_and_counted():
    short, long = trace_decoder_layer(4096), trace_decoder_layer(131072)
    assert abs(long["peak"] / short["peak"] - 1) < 0.03, (short, long)  # an (L x L) tensor would be 32x a token
    assert abs(long["kept"] / short["kept"] - 1) < 0.03, (short, long)
    assert 200e3 < short["peak"] < 350e3, short  # bytes a token in bf16
    assert short["kept"] < short["peak"] and short["upstream"] == 2 * 4096
    formula = dict(zip(("kept", "peak"), decoder_layer_bytes(layer_config().text_config, b=2), strict=True))
    for key in ("kept", "peak"):
        assert abs(short[key] / formula[key] - 1) < 0.05, (key, short, formula)


def test_the_trace_in_fp32_matches_the_formula_too():
    """In fp32 the RMSNorms' upcasts are no-ops: input_layernorm's fp32 input is the layer's input itself."""
    trace = trace_decoder_layer(2048, torch.float32)
    formula = dict(zip(("kept", "peak"), decoder_layer_bytes(layer_config().text_config, b=4), strict=True))
    for key in ("kept", "peak"):
        assert abs(trace[key] / formula[key] - 1) < 0.05, (key, trace, formula)
