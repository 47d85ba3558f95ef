"""Ulysses sequence parallelism over 2 gloo ranks against whole rows in one process."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).with_name("sequence_parallel_run.py")


@pytest.mark.slow
def test_two_ranks_sharing_each_row_give_the_loss_and_gradients_of_whole_rows(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", str(SCRIPT), str(tmp_path)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-4000:]
    result = torch.load(tmp_path / "result.pt")
    (loss, targets, _tokens), grads = result["sp"]
    (whole_loss, whole_targets), reference = result["whole"]
    assert targets == whole_targets  # each target counted once, by one rank of the pair
    assert loss == pytest.approx(whole_loss, rel=1e-6)
    assert result["engine"][0] == 2  # DeepSpeed saw the sequence-parallel group
    assert any(g.abs().sum() > 0 for name, g in reference.items() if name.startswith("vision_model."))
    for name, grad in reference.items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)
