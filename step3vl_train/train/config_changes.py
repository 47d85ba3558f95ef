"""What a resumed run may change from the config its checkpoint was written with.

A checkpoint keeps the config it was written under (`config.yaml`). On resume every changed key is either
applied from the current config and logged, or refused with one message naming each refused key:

- Applied: the optimizer's hyper-parameters (`optim.lr`, `betas`, `eps`, `weight_decay`, `schedule.*`,
  a param group's `lr`, `weight_decay`, `warmup_tokens`), which are written over the ones DeepSpeed
  restores with the optimizer state; `trainer.grad_clip`, `grad_accum`, the run's length, saving, logging,
  `compute.*`, `deepspeed.*` but the ZeRO stage; a phase that has not begun; anything else not listed below.
- Refused, because the checkpoint's state belongs to them: the model, processor and tokenizer (the
  weights and the encoded data); how data is read and packed (`data.sources`, `packing`, `seed`,
  `max_epochs`, `micro_batch_size`, `num_workers`, `train`, `trainer.sequence_parallel`: the readers'
  positions are positions in that stream); the param groups' names and patterns (the optimizer state is
  per group); `trainer.bf16` and the ZeRO stage (the saved states' dtype and partitioning); and the
  mixture and start of a phase already begun.
"""

from __future__ import annotations

from fnmatch import fnmatchcase
from typing import Any

from step3vl_train.usage import UsageError

REFUSED = {
    "tokenizer": "the data was encoded with it",
    "model.*": "the weights are this model's",
    "processor.*": "the data was encoded with it",
    "data.sources*": "the data position is a position in these sources",
    "data.train": "the data position is a position in these sources",
    "data.packing.*": "the data position is a position in this packing",
    "data.seed": "the readers' order follows it",
    "data.max_epochs": "the readers' order follows it",
    "data.micro_batch_size": "the data position counts its batches",
    "data.num_workers": "each reader's position belongs to a (rank, worker)",
    "trainer.sequence_parallel": "each reader's position belongs to a data-parallel rank",
    "trainer.bf16": "the saved states are in the old dtype",
    "deepspeed.zero_optimization.stage": "the saved states are partitioned for it",
    "optim.param_groups.*.name": "the optimizer state is kept by group",
    "optim.param_groups.*.pattern": "the optimizer state is kept by group",
}
BEGUN_PHASE = "the mixture of a phase already begun"


def flatten(config: Any, prefix: str = "") -> dict[str, Any]:
    """{"optim.lr": 1e-3, "data.sources.0.name": "text", ...} from nested dicts and lists."""
    if isinstance(config, dict | list) and config:
        items = config.items() if isinstance(config, dict) else enumerate(config)
        return {flat: value for key, child in items for flat, value in flatten(child, f"{prefix}{key}.").items()}
    return {prefix.removesuffix("."): config}


def changes_since_checkpoint(saved: dict, current: dict, tokens: int) -> list[str]:
    """The changed keys that a resume at `tokens` applies, as `key: old -> new` lines; raises a UsageError
    naming every key it cannot apply."""
    old, new = flatten(saved), flatten(current)
    applied, refused = [], []
    for key in sorted(old.keys() | new.keys()):
        before, after = old.get(key, "(unset)"), new.get(key, "(unset)")
        if before == after:
            continue
        reason = next((why for pattern, why in REFUSED.items() if fnmatchcase(key, pattern)), None)
        if key == "data.num_workers" and after == "auto":
            reason = None  # the loader resumes with the checkpoint's workers (data/loader.py)
        if reason is None and _in_begun_phase(key, saved, current, tokens):
            reason = BEGUN_PHASE
        if reason is None:
            applied.append(f"{key}: {before} -> {after}")
        else:
            refused.append(f"{key} ({before} -> {after}: {reason})")
    if refused:
        raise UsageError(
            "this run resumes from a checkpoint written with another config, and these keys cannot change on a "
            f"resume: {'; '.join(refused)}. Put them back, or start a new run from the checkpoint's export "
            "(launch/export_hf.py, then trainer.init_from)"
        )
    return applied


def _in_begun_phase(key: str, saved: dict, current: dict, tokens: int) -> bool:
    """A phase's start or weights, where the phase had begun by `tokens` in either config."""
    parts = key.split(".")
    if parts[0] != "phases" or len(parts) < 3 or parts[2] not in ("start_tokens", "weights"):
        return False
    starts = [config.get("phases", {}).get(parts[1], {}).get("start_tokens") for config in (saved, current)]
    return any(start is not None and start <= tokens for start in starts)
