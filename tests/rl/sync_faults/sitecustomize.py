"""Loaded at start-up by every Python process of an RL run whose PYTHONPATH starts with this folder
(tests/rl/test_sync_failure.py), the Ray actors included: the transformers engine's weight updates after the
first take the faults listed in the file `$SYNC_FAULTS`, one line a sync, in order: `ok`, `raise` (the
engine fails inside its update, as a receive that runs out of GPU memory would), `hang` (it never returns, as
an engine waiting in a broadcast its sender left would)."""

import importlib.abc
import importlib.util
import os
import sys
import time
from pathlib import Path

FAULTS = os.environ.get("SYNC_FAULTS")


def take_fault() -> str:
    path = Path(FAULTS)
    lines = path.read_text().split()
    path.write_text("\n".join(lines[1:]))
    return lines[0] if lines else "ok"


def add_faults(module) -> None:
    load_weights = module.HFEngine.load_weights

    def faulty_load_weights(self, tensors):
        if self.complete and not self.updated:  # the first bucket of a sync after the first
            fault = take_fault()
            if fault == "raise":
                raise RuntimeError("CUDA out of memory (injected by tests/rl/sync_faults)")
            if fault == "hang":
                time.sleep(3600)
        load_weights(self, tensors)

    module.HFEngine.load_weights = faulty_load_weights


class AddFaultsOnImport(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != "rl.engines.hf":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        run_module = spec.loader.exec_module

        def exec_module(module):
            run_module(module)
            add_faults(module)

        spec.loader.exec_module = exec_module
        return spec


if FAULTS:
    sys.meta_path.insert(0, AddFaultsOnImport())
