"""Training checkpoints: DeepSpeed's ZeRO shards plus each rank's loader and RNG state.

`<run>/checkpoints/step_N/` holds what `engine.save_checkpoint` writes and `trainer_rank{R}.pt` per rank.
`<run>/checkpoints/latest` names the newest complete one; it is replaced atomically, and only after every
rank has finished writing, so a kill at any moment leaves it pointing at a whole checkpoint.
"""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

LATEST = "latest"


def rng_state() -> dict:
    """Python, numpy and torch RNG state in types `torch.load(weights_only=True)` accepts."""
    version, state, gauss = random.getstate()
    np_kind, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    return {
        "python": [version, list(state), gauss],
        "numpy": [np_kind, np_keys.tolist(), np_pos, np_has_gauss, np_gauss],
        "torch": torch.get_rng_state(),
    }


def set_rng_state(state: dict) -> None:
    version, values, gauss = state["python"]
    random.setstate((version, tuple(values), gauss))
    kind, keys, pos, has_gauss, gauss_value = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, gauss_value))
    torch.set_rng_state(state["torch"])


class Checkpointer:
    def __init__(self, run_dir: str | Path, keep_last: int):
        self.root = Path(run_dir) / "checkpoints"
        self.keep_last = keep_last

    def latest(self) -> Path | None:
        pointer = self.root / LATEST
        if not pointer.exists():
            return None
        path = self.root / pointer.read_text().strip()
        if not path.is_dir():
            raise FileNotFoundError(f"{pointer} names {path.name}, which does not exist")
        return path

    def save(self, engine, step: int, state: dict) -> Path:
        """Collective: every rank calls it. `state` is this rank's (loader, counters); RNG is added here."""
        tag = f"step_{step}"
        engine.save_checkpoint(str(self.root), tag=tag, save_latest=False)
        torch.save({**state, "rng": rng_state()}, self.root / tag / f"trainer_rank{dist.get_rank()}.pt")
        dist.barrier()
        if dist.get_rank() == 0:
            self.publish(tag)
        dist.barrier()
        return self.root / tag

    def publish(self, tag: str) -> None:
        """Points `latest` at the complete checkpoint `tag` (atomically), then deletes the oldest ones."""
        temporary = self.root / f".{LATEST}.tmp"
        temporary.write_text(tag)
        os.replace(temporary, self.root / LATEST)
        self._prune(keep=tag)

    def load(self, engine) -> dict | None:
        """Restores the newest complete checkpoint into `engine` and the RNGs; returns this rank's state."""
        path = self.latest()
        if path is None:
            return None
        engine.load_checkpoint(str(self.root), tag=path.name)
        state = torch.load(path / f"trainer_rank{dist.get_rank()}.pt", weights_only=True)
        set_rng_state(state.pop("rng"))
        return state

    def _prune(self, keep: str) -> None:
        steps = sorted(
            (p for p in self.root.glob("step_*") if p.is_dir()), key=lambda p: int(p.name.removeprefix("step_"))
        )
        for old in steps[: max(0, len(steps) - self.keep_last)]:
            if old.name != keep:
                shutil.rmtree(old)
