"""Two-rank RL worker tests: each rank a `python -m MODULE RANK PORT OUT` process on loopback (the
module's own `__main__` builds its worker and writes OUT/rank{R}.pt)."""

import os
import subprocess
import sys
from pathlib import Path

import torch
from deepspeed.utils import safe_get_full_grad

from step3vl_train.train.distributed import free_port
from tests.conftest import REPO


def run_ranks(module: str, out: Path, timeout: float, world: int = 2) -> None:
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    processes = [
        subprocess.Popen(
            [sys.executable, "-m", module, str(rank), str(port), str(out)],
            cwd=REPO,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        for rank in range(world)
    ]
    for process in processes:
        _, stderr = process.communicate(timeout=timeout)
        assert process.returncode == 0, stderr[-4000:]


def record_gradients(engines: dict) -> dict[str, list[dict[str, torch.Tensor]]]:
    """Each engine's (a name's `Engine`) whole gradients of its trained parameters at every optimizer step
    from now on, gathered (a collective) before the step; `stop_recording` ends it."""
    grads = {name: [] for name in engines}
    for name, e in engines.items():
        step = e.engine.step

        def recorded(step=step, name=name, e=e):
            trained = [(n, p) for n, p in e.model.named_parameters() if p.requires_grad]
            grads[name].append({n: safe_get_full_grad(p).clone() for n, p in trained})
            step()

        e.engine.step = recorded
    return grads


def stop_recording(engines: dict) -> None:
    for e in engines.values():
        del e.engine.step  # the class's again
