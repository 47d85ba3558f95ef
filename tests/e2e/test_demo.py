import json
import subprocess
import sys

import pytest

from tests.conftest import REPO


@pytest.mark.slow
def test_demo_runs_end_to_end(tmp_path):
    result = subprocess.run(
        [sys.executable, "launch/demo.py", f"output_dir={tmp_path}"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    steps = {row["step"]: row for row in map(json.loads, result.stdout.splitlines())}
    assert steps["processed"]["num_crops"] == 6 and steps["processed"]["image_tokens"] == 6 * 9 + 16
    assert 0 < steps["forward_backward"]["loss"] < 20 and steps["forward_backward"]["grad_norm"] > 0
    assert steps["save_reload"]["logits_identical"] is True
    assert steps["generate"]["new_tokens"] > 0
    assert (tmp_path / "model" / "model.safetensors.index.json").exists()
    packed = [row for row in map(json.loads, result.stdout.splitlines()) if row["step"] == "packed_batch"]
    assert len(packed) == 2 and all(0 < row["loss"] < 20 for row in packed)
    assert sum(row["samples"] for row in packed) > 2 and sum(row["images"] for row in packed) > 0
    assert steps["data"]["skipped_samples"] == 0 and steps["data"]["samples"] == sum(row["samples"] for row in packed)


@pytest.mark.slow
def test_demo_pipeline_chains_every_stage(tmp_path):
    """make demo's second half, shortened: pre-training -> export -> SFT -> export -> RLVR -> plot, summary."""
    result = subprocess.run(
        [sys.executable, "launch/demo_pipeline.py", "--out", str(tmp_path), "--steps", "3", "--rl-steps", "2"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    summary = (tmp_path / "summary.md").read_text()
    assert "| pre-training (loss) | 3 |" in summary and "| SFT (loss) | 3 |" in summary
    assert "| RLVR (reward_mean) | 2 |" in summary
    assert (tmp_path / "rlvr" / "reward_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for export in ("pretrain_hf", "sft_hf"):
        assert (tmp_path / export / "config.json").exists()
    rl_config = (tmp_path / "rlvr" / "config.yaml").read_text()
    assert f"init_from: {tmp_path / 'sft_hf'}" in rl_config  # each stage starts from the one before
