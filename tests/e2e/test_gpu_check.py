"""The GPU check's CPU form: the same stages (pre-training and SFT through their entry points, one RL
iteration in-process without Ray) on the tiny model, so that the prepared check does not rot between
the days a GPU is lent."""

import json
import subprocess
import sys

import pytest

from tests.conftest import REPO


@pytest.mark.slow
def test_the_gpu_check_runs_every_stage_on_the_cpu(tmp_path):
    command = [sys.executable, str(REPO / "benchmarks/gpu/check.py"), "--out", str(tmp_path), "--smoke",
               "--steps", "2", "--warmup", "0"]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    results = json.loads((tmp_path / "results.json").read_text())
    for stage, steps in (("pretrain_4k", 2), ("sft_32k", 2)):
        assert results[stage]["steps"] == steps and results[stage]["tokens_per_s"] > 0, results[stage]
        assert results[stage]["estimate_gib"] > 0
    assert results["rl"]["time/update"] > 0 and "reward_mean" in results["rl"]
    assert "| pretrain_4k |" in (tmp_path / "summary.md").read_text()
