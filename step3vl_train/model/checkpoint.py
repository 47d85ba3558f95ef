"""The released checkpoint layout on disk: `config.json`, `model-0000i-of-0000n.safetensors` shards and
`model.safetensors.index.json`, under the released tensor names (spec section 2.5).

Like the released checkpoint, a directory carries the code `config.json`'s `auto_map` names (remote_code.py):
the configuration module, `configuration_step_vl.py`, which `AutoConfig` and vLLM (with `trust_remote_code`)
open the way they open StepFun's, and a model's directory also its modeling code, `modeling_step_vl.py` and
the modules it imports, for `AutoModelForImageTextToText` and `AutoModelForCausalLM`. The configuration
module is `model/config.py` as it is, since that imports nothing but transformers."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from huggingface_hub import split_torch_state_dict_into_shards
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from step3vl_train.model.config import Step3VLConfig
from step3vl_train.model.remote_code import write_remote_code

CONFIG_NAME = "config.json"
INDEX_NAME = "model.safetensors.index.json"
SINGLE_FILE_NAME = "model.safetensors"


class CheckpointMismatchError(ValueError):
    """A state dict whose tensor names or shapes differ from the model's."""


def check_state_dict(expected: dict[str, torch.Size], given: dict[str, torch.Size], source: str) -> None:
    """Raises CheckpointMismatchError naming every missing, unexpected and wrongly shaped tensor."""
    missing = sorted(set(expected) - set(given))
    unexpected = sorted(set(given) - set(expected))
    wrong_shape = sorted(
        f"{name}: checkpoint {tuple(given[name])} vs model {tuple(expected[name])}"
        for name in set(expected) & set(given)
        if tuple(given[name]) != tuple(expected[name])
    )
    problems = [
        f"{label} ({len(names)}): {', '.join(names)}"
        for label, names in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong_shape))
        if names
    ]
    if problems:
        raise CheckpointMismatchError(f"{source}: " + "; ".join(problems))


def save_released(model: nn.Module, directory: str | os.PathLike, max_shard_size: str | int = "4GB") -> Path:
    """Writes the model in the released layout. The directory appears complete or not at all: files are
    written to a temporary sibling that replaces `directory` at the end."""
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    state = {name: tensor.detach().cpu().contiguous() for name, tensor in model.state_dict().items()}
    split = split_torch_state_dict_into_shards(state, max_shard_size=max_shard_size)
    staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    try:
        for filename, names in split.filename_to_tensors.items():
            save_file({name: state[name] for name in names}, staging / filename, metadata={"format": "pt"})
        index = {"metadata": split.metadata, "weight_map": dict(sorted(split.tensor_to_filename.items()))}
        (staging / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
        save_config(model.config, staging, model_class=type(model))
        if directory.exists():
            shutil.rmtree(directory)
        staging.rename(directory)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return directory


def save_config(config: Step3VLConfig, directory: Path, model_class: type | None = None) -> None:
    """`config.json` and the configuration module it names; with `model_class`, that class's modeling code
    too, named for the Auto classes that load a model (the released checkpoint names AutoModelForCausalLM)."""
    auto_map = {"AutoConfig": write_remote_code(type(config), directory)}
    if model_class is not None:
        model_reference = write_remote_code(model_class, directory)
        auto_map |= {"AutoModelForCausalLM": model_reference, "AutoModelForImageTextToText": model_reference}
    released = config.to_released_dict()
    released["auto_map"] = auto_map
    (directory / CONFIG_NAME).write_text(json.dumps(released, indent=2, sort_keys=True) + "\n")


def read_released_tensors(directory: str | os.PathLike) -> dict[str, torch.Tensor]:
    """All tensors of a released-layout directory (sharded with an index, or one `model.safetensors`)."""
    directory = Path(directory)
    if (directory / INDEX_NAME).exists():
        weight_map = json.loads((directory / INDEX_NAME).read_text())["weight_map"]
        files = sorted(set(weight_map.values()))
    elif (directory / SINGLE_FILE_NAME).exists():
        files = [SINGLE_FILE_NAME]
    else:
        raise FileNotFoundError(f"{directory}: no {INDEX_NAME} or {SINGLE_FILE_NAME}")
    tensors: dict[str, torch.Tensor] = {}
    for filename in files:
        with safe_open(directory / filename, framework="pt") as shard:
            tensors.update({name: shard.get_tensor(name) for name in shard.keys()})
    return tensors


def load_released(
    directory: str | os.PathLike,
    dtype: torch.dtype | None = None,
    config: Step3VLConfig | None = None,
    model_class=None,
):
    """Builds the model (`model_class`, default the policy's) from `config` (by default the directory's
    `config.json`) without initialising weights, then assigns the stored tensors."""
    directory = Path(directory)
    if config is None:
        config = Step3VLConfig.from_json_file(directory / CONFIG_NAME)
    return model_from_tensors(config, read_released_tensors(directory), str(directory), dtype, model_class)


def model_from_tensors(
    config: Step3VLConfig, tensors: dict[str, torch.Tensor], source: str, dtype=None, model_class=None
):
    """The model (`model_class`, default the policy's) holding exactly `tensors` (released names), built on
    the meta device so nothing is initialised twice; `source` names where they came from in mismatch errors."""
    from step3vl_train.model.step3vl import Step3VLForConditionalGeneration

    with torch.device("meta"):
        model = (model_class or Step3VLForConditionalGeneration)(config)
    check_state_dict(
        {k: v.shape for k, v in model.state_dict().items()}, {k: v.shape for k, v in tensors.items()}, source
    )
    if dtype is not None:
        tensors = {name: tensor.to(dtype) for name, tensor in tensors.items()}
    model.load_state_dict(tensors, strict=True, assign=True)
    # The decoder's RoPE frequencies are a non-persistent buffer, so they are rebuilt rather than loaded.
    model.model.rotary_emb = type(model.model.rotary_emb)(config=config.text_config)
    return model.eval()
