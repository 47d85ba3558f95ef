"""ZeRO-3 over 2 ranks (gloo, CPU) with the real DeepSpeed engine."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).with_name("zero3_run.py")


@pytest.mark.slow
def test_ranks_with_different_batch_kinds_never_hang(tmp_path):
    """Text-only, image-with-crops and global-only batches on different ranks at the same step, in bf16,
    with activation checkpointing: the ViT runs on every rank whenever one rank has views, as many calls
    as the rank's own views need, and a step where no rank has an image makes no ViT call on any. ZeRO-3's
    recorded module order survives every mix: no "Invalidate trace cache" once recorded, and the same
    all-gathers every micro-step (the image path and the head are kept whole; the decoder prefetched). So
    does a validation whose ranks hold different numbers and kinds of batches: its sums are those of every
    batch run on one rank, the stand-ins adding nothing."""
    import torch

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", str(SCRIPT), str(tmp_path), "8"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-4000:]
    steady = done.stdout.split("steady state from here")[1].split("steady state ends")[0]
    assert "Invalidate trace cache" not in steady, steady
    for rank in range(2):
        result = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert len(result["losses"]) == 8 and all(math.isfinite(loss) for loss in result["losses"])
        assert result["vision_moved"] > 0  # the ViT was trained
        assert result["text_step_vision_calls"] == 0 and result["vision_moved_on_text"] > 0
        assert result["text_step_vision_grad"] == 0  # not the image step's gradient before it
        # The image path and the head kept whole on every rank, out of ZeRO-3's module hooks, and gathered
        # with DeepSpeed's small tensors in one collective after each update (its own list, a collective a
        # tensor, left empty).
        assert result["kept_whole"] == result["kept_available"] > 0 and result["kept_persistent"] == 0
        assert result["kept_hooked"] == 0 and result["persistent"] == 0
        assert len(set(result["gathers"][2:])) == 1, result["gathers"]  # whatever the batch kinds
        # bf16 weights; gradients summed over micro-steps and reduced over ranks in fp32
        assert result["param_dtype"] == "torch.bfloat16"
        assert result["grad_dtypes"] == ["torch.float32", "torch.float32"]
        sums, reference = torch.tensor(result["eval_sums"]), torch.tensor(result["eval_reference"])
        torch.testing.assert_close(sums, reference, rtol=1e-6, atol=0)
        assert (sums[:, 1] > 0).all()


@pytest.mark.slow
def test_accumulation_packing_and_chunking_leave_the_gradients_unchanged(tmp_path):
    import torch

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    script = SCRIPT.with_name("equivalence_run.py")
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", str(script), str(tmp_path)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-4000:]
    grads = torch.load(tmp_path / "grads.pt")
    reference = grads["4x1"]
    assert any(g.abs().sum() > 0 for name, g in reference.items() if name.startswith("vision_model."))
    for split in ("1x4", "packed", "4x1-chunked"):
        for name, grad in grads[split].items():
            torch.testing.assert_close(grad, reference[name], rtol=1e-5, atol=1e-7, msg=f"{split}: {name}")
