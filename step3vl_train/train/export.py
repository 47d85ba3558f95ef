"""A training checkpoint -> the released model format, on one process and without the training world size.

DeepSpeed's `zero_to_fp32` consolidates the ZeRO-3 shards of any number of ranks into one fp32 state dict;
the model's own `save_pretrained` then writes the released layout (config.json, sharded safetensors), and
the run's processor goes beside it (its tokenizer, chat template and image settings, with the code
transformers' AutoProcessor opens it with: processing/model_processor.py).
A reward model's run (launch/train_rm.py) exports its value head in place of the LM head, and
`reward_stats.json`, the score statistics its checkpoint holds.
"""

from __future__ import annotations

from pathlib import Path

import torch
from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
from omegaconf import OmegaConf

from step3vl_train.model import Step3VLConfig
from step3vl_train.model.checkpoint import model_from_tensors
from step3vl_train.model.value import CRITIC_ONLY, Step3VLForValue
from step3vl_train.processing.model_processor import save_processor
from step3vl_train.processing.processor import load_processor
from step3vl_train.train.checkpoint import Checkpointer
from step3vl_train.train.reward_model import RewardStats


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
    value_head = any(name.startswith(CRITIC_ONLY) for name in state)
    model_class = Step3VLForValue if value_head else None
    model_from_tensors(config, state, str(step_dir), dtype, model_class).save_pretrained(out)
    if value_head:
        reward_stats(step_dir).save(out)
    save_processor(load_processor(run_config.tokenizer, OmegaConf.to_container(run_config.processor)), out)
    return Path(out)


def reward_stats(step_dir: Path) -> RewardStats:
    """The score statistics a reward model's checkpoint holds (every rank saves the same ones)."""
    stats = torch.load(step_dir / "trainer_rank0.pt", weights_only=True).get("reward_stats")
    if stats is None:
        raise ValueError(f"{step_dir} holds no reward statistics: it was saved before the first training step")
    return RewardStats(**stats)
