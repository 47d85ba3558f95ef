"""Ulysses sequence parallelism over 2 gloo ranks against whole rows in one process."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from step3vl_train.train.engine import check_gradient_reduce
from step3vl_train.usage import UsageError

SCRIPT = Path(__file__).with_name("sequence_parallel_run.py")


@pytest.mark.slow
def test_two_ranks_sharing_each_row_give_the_loss_and_gradients_of_whole_rows(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", str(SCRIPT), str(tmp_path)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-4000:]
    result = torch.load(tmp_path / "result.pt")
    (whole_loss, whole_targets), reference = result["whole"]
    assert result["engine"][0] == 2  # DeepSpeed saw the sequence-parallel group
    assert any(g.abs().sum() > 0 for name, g in reference.items() if name.startswith("vision_model."))
    for setting in ("reduce_scatter", "no_reduce_scatter"):
        (targets, loss, _tokens, missing, views), grads = result[setting]
        assert targets == whole_targets and missing == 0  # each target counted once, by one rank of the pair
        assert 0 < views < result["views"]  # rank 0 held the views of its halves, not all of the rows' views
        assert loss / targets == pytest.approx(whole_loss, rel=1e-6)
        for name, grad in reference.items():
            torch.testing.assert_close(grads[name], grad, rtol=1e-4, atol=1e-6, msg=f"{setting}: {name}")


def test_a_gradient_reduce_that_would_scale_some_gradients_by_the_degree_is_refused():
    """reduce_scatter off with contiguous gradients averages bucketed tensors over world / SP ranks and
    larger ones over the world (DeepSpeed 0.19): no one loss scaling is right for both."""
    check_gradient_reduce({"reduce_scatter": False}, 1)  # the same divisor both ways without SP
    check_gradient_reduce({"reduce_scatter": False, "contiguous_gradients": False}, 2)
    with pytest.raises(UsageError, match="contiguous_gradients"):
        check_gradient_reduce({"reduce_scatter": False}, 2)
