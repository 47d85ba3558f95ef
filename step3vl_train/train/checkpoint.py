"""Training checkpoints: DeepSpeed's ZeRO shards plus each rank's loader and RNG state.

`<run>/checkpoints/step_N/` holds what `engine.save_checkpoint` writes and `trainer_rank{R}.pt` per rank.
`<run>/checkpoints/latest` names the published checkpoint, the one a resume loads. A checkpoint is written
into `step_N.partial/`, fsynced, renamed to `step_N/`, and only then published by replacing `latest`
atomically; a published checkpoint is never rewritten. A kill at any moment of a save or of pruning
therefore leaves `latest` naming a whole checkpoint, and the next commit clears what the kill left.
"""

from __future__ import annotations

import os
import random
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

LATEST = "latest"
COMPLETE = re.compile(r"step_(\d+)")
PARTIAL = ".partial"  # being written
DISCARDED = ".discarded"  # being deleted: renamed first, so that a half-deleted one never looks complete
LATEST_TEMPORARY = f".{LATEST}.tmp"  # write_atomically's, left by a kill before its replace


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


def fsync_path(path: Path) -> None:
    """Flushes a file's data, or a directory's entries, to the disk."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def write_atomically(path: Path, text: str) -> None:
    """`path` holds `text` whole, or what it held before, whenever the process dies: the text goes to a
    hidden temporary beside it, fsynced, replaces it, and the directory entry is fsynced."""
    temporary = path.with_name(f".{path.name}.tmp")
    with temporary.open("w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)
    fsync_path(path.parent)


def fsync_tree(root: Path) -> None:
    """Every file and directory under `root`, `root` included. A file written by another process is
    flushed too: on one machine its dirty pages belong to the file, not to the writer."""
    for directory, _, files in os.walk(root):
        for name in files:
            fsync_path(Path(directory, name))
        fsync_path(Path(directory))


class Checkpointer:
    def __init__(self, run_dir: str | Path, keep_last: int, fault: Callable[[str], None] | None = None):
        """`keep_last`: complete checkpoints kept, the published one always among them. `fault(point)` is
        called at each named point of a save and of pruning ("begun", "engine_saved", "written", "renamed",
        "published", "pruning"); tests raise or kill the process there."""
        self.root = Path(run_dir) / "checkpoints"
        self.keep_last = keep_last
        self.fault = fault or (lambda point: None)

    def latest(self) -> Path | None:
        pointer = self.root / LATEST
        if not pointer.exists():
            return None
        path = self.root / pointer.read_text().strip()
        if not path.is_dir():
            raise FileNotFoundError(f"{pointer} names {path.name}, which does not exist")
        return path

    def save(self, engine, step: int, state: dict, files: dict[str, str] | None = None) -> Path:
        """Collective: every rank calls it. `state` is this rank's (loader, counters); RNG is added here.
        `files` (name -> text, e.g. the config) are written by rank 0. Returns `step_{step}`; if that is
        already the published checkpoint, nothing is written."""
        final = self.complete(step)
        if self.published(step):
            return final
        rank = dist.get_rank()
        if rank == 0:
            self.begin(step)
        dist.barrier()
        partial = self.partial(step)
        engine.save_checkpoint(str(self.root), tag=partial.name, save_latest=False)
        self.fault("engine_saved")
        torch.save({**state, "rng": rng_state()}, partial / f"trainer_rank{rank}.pt")
        if rank == 0:
            for name, text in (files or {}).items():
                (partial / name).write_text(text)
        # Each rank flushes what it wrote before rank 0 publishes: ranks on other machines hold their own pages.
        fsync_tree(partial)
        dist.barrier()
        if rank == 0:
            self.commit(step)
        dist.barrier()
        return final

    def begin(self, step: int) -> Path:
        """The empty `step_{step}.partial` directory, for one writer to fill before `commit(step)`. What a
        crashed save left there is cleared first."""
        self._refuse_to_rewrite(step)
        partial = self.partial(step)
        if partial.exists():
            shutil.rmtree(partial)
        partial.mkdir(parents=True)
        self.fault("begun")
        return partial

    def commit(self, step: int) -> Path:
        """One process: fsyncs `step_{step}.partial`, renames it to `step_{step}` (replacing an unpublished
        one a crash left), points `latest` at it, then prunes. Returns the published directory."""
        self._refuse_to_rewrite(step)
        partial, final = self.partial(step), self.complete(step)
        fsync_tree(partial)
        self.fault("written")
        if final.exists():
            shutil.rmtree(self._set_aside(final))
        os.rename(partial, final)
        fsync_path(self.root)
        self.fault("renamed")
        write_atomically(self.root / LATEST, final.name)
        self.fault("published")
        self._prune(step)
        return final

    def load(self, engine) -> dict | None:
        """Restores the published checkpoint into `engine` and the RNGs; returns this rank's state."""
        path = self.latest()
        if path is None:
            return None
        engine.load_checkpoint(str(self.root), tag=path.name)
        state = torch.load(path / f"trainer_rank{dist.get_rank()}.pt", weights_only=True)
        set_rng_state(state.pop("rng"))
        return state

    def published(self, step: int) -> bool:
        """Whether `step_{step}` is the published checkpoint."""
        return self.latest() == self.complete(step)

    def complete(self, step: int) -> Path:
        return self.root / f"step_{step}"

    def partial(self, step: int) -> Path:
        return self.root / f"step_{step}{PARTIAL}"

    def _refuse_to_rewrite(self, step: int) -> None:
        if self.published(step):
            raise ValueError(f"{self.complete(step)} is the published checkpoint; it is never rewritten")

    def _prune(self, published: int) -> None:
        """Keeps the newest `keep_last` complete checkpoints up to the published one (which always stays).
        Those after it belong to a timeline the run has left (a crash before publishing, or a rollback);
        they go, as do a crash's partial and half-deleted directories."""
        complete = sorted(
            (int(match[1]), path)
            for path in self.root.iterdir()
            if (match := COMPLETE.fullmatch(path.name)) and path.is_dir()
        )
        kept = [path for step, path in complete if step <= published][-max(self.keep_last, 1) :]
        stale = [self._set_aside(path) for _, path in complete if path not in kept]
        if stale:
            self.fault("pruning")
        for leftover in self.root.iterdir():
            if leftover.name.endswith((PARTIAL, DISCARDED)):
                shutil.rmtree(leftover)
            elif leftover.name == LATEST_TEMPORARY:
                leftover.unlink()

    def _set_aside(self, path: Path) -> Path:
        """Renames a complete checkpoint out of the way, to delete it without its half ever looking whole."""
        aside = path.with_name(path.name + DISCARDED)
        if aside.exists():
            shutil.rmtree(aside)
        os.rename(path, aside)
        fsync_path(self.root)  # before any file in it goes
        return aside
