"""Two-rank RL worker tests: each rank a `python -m MODULE RANK PORT OUT` process on loopback (the
module's own `__main__` builds its worker and writes OUT/rank{R}.pt)."""

import os
import subprocess
import sys
from pathlib import Path

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
