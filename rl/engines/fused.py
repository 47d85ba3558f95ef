"""The modules vLLM loads our tensors into, and the freeze prefixes a vLLM weight sync cannot take.

vLLM fuses tensors that we keep apart: the decoder's q, k, v projections into one `qkv_proj`, gate and up
into `gate_up_proj`, the vision tower's `in_proj_weight` and `in_proj_bias` into `attn.qkv_proj`. Every
other tensor lands in the module that holds it, beside its siblings (a LayerNorm's weight and bias).

A weight update goes through vLLM's layerwise reload, which rebuilds each module from what arrived: a
module that received only some of its tensors gets the others from `empty_strided`, and the whole module is
copied back, garbage included. The sync after the first sends the trainable tensors alone, so a freeze
prefix must not cut a module in two (tests/contract checks this grouping against vLLM's model class).
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Iterable

FUSED = [
    (re.compile(r"^(.*\.self_attn)\.[qkv]_proj\.[^.]+$"), r"\1.qkv_proj"),
    (re.compile(r"^(.*\.mlp)\.(?:gate|up)_proj\.[^.]+$"), r"\1.gate_up_proj"),
    (re.compile(r"^(.*\.attn)\.in_proj_(?:weight|bias)$"), r"\1.qkv_proj"),
]


def vllm_module(name: str) -> str:
    """The module (our naming, vLLM's fusion) that vLLM loads tensor `name` into."""
    for pattern, module in FUSED:
        if pattern.match(name):
            return pattern.sub(module, name)
    return name.rpartition(".")[0]


def split_modules(names_trainable: Iterable[tuple[str, bool]]) -> dict[str, tuple[list[str], list[str]]]:
    """The modules that hold both trainable and frozen tensors: module -> (trainable, frozen) names."""
    modules: dict[str, tuple[list[str], list[str]]] = defaultdict(lambda: ([], []))
    for name, trainable in names_trainable:
        modules[vllm_module(name)][0 if trainable else 1].append(name)
    return {module: parts for module, parts in modules.items() if parts[0] and parts[1]}


def check_whole_modules(names_trainable: Iterable[tuple[str, bool]], setting: str = "policy.freeze") -> None:
    """Refuses a freeze that trains part of a module vLLM loads as one (see the module's docstring)."""
    split = split_modules(names_trainable)
    if split:
        module, (trained, frozen) = next(iter(split.items()))
        raise ValueError(
            f"{setting} splits {len(split)} module(s) that vLLM loads whole, e.g. {module}: {trained[0]} trains, "
            f"{frozen[0]} is frozen. vLLM's weight update would rebuild the module from the trainable tensors "
            f"alone and fill the rest with uninitialised memory. Freeze or train each of "
            f"{sorted(split)[:3]} whole."
        )
