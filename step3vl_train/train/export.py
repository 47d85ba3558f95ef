"""A training checkpoint -> the released model format, on one process and without the training world size.

DeepSpeed's `zero_to_fp32` consolidates the ZeRO-3 shards of any number of ranks into one fp32 state dict;
the model's own `save_pretrained` then writes the released layout (config.json, sharded safetensors).
"""

from __future__ import annotations

from pathlib import Path

import torch
from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
from omegaconf import OmegaConf

from step3vl_train.model import Step3VLConfig
from step3vl_train.model.checkpoint import model_from_tensors
from step3vl_train.processing.tokenizer import load_tokenizer
from step3vl_train.train.checkpoint import Checkpointer


def resolve_checkpoint(path: str | Path) -> tuple[Path, Path]:
    """(run directory, checkpoint directory) for a run directory (its latest) or a `checkpoints/step_N`."""
    path = Path(path).resolve()
    if path.parent.name == "checkpoints" and path.name.startswith("step_"):
        return path.parent.parent, path
    latest = Checkpointer(path, keep_last=0).latest()
    if latest is None:
        raise FileNotFoundError(f"{path} is neither a checkpoints/step_N directory nor a run with a checkpoint")
    return path, latest


def export_checkpoint(checkpoint: str | Path, out: str | Path, dtype: torch.dtype = torch.float32) -> Path:
    run_dir, step_dir = resolve_checkpoint(checkpoint)
    run_config = OmegaConf.load(run_dir / "config.yaml")
    config = Step3VLConfig.from_dict(OmegaConf.to_container(run_config.model, resolve=True))
    if (step_dir / "policy").is_dir():  # an RL run: the policy's shards (the critic's sit beside them)
        state = get_fp32_state_dict_from_zero_checkpoint(str(step_dir), tag="policy")
    else:
        state = get_fp32_state_dict_from_zero_checkpoint(str(step_dir.parent), tag=step_dir.name)
    model_from_tensors(config, state, str(step_dir), dtype).save_pretrained(out)
    load_tokenizer(run_config.tokenizer).save_pretrained(out)
    return Path(out)
