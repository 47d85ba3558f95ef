"""The GPU check's CPU form: the same stages (pre-training at one and eight micro-batches a step and SFT
through their entry points, two RL iterations in-process without Ray) on the tiny model, so that the
prepared check does not rot between the days a GPU is lent; and its stage runner, which must keep going
past a stage that runs out of time."""

import json
import subprocess
import sys

import pytest

from benchmarks.gpu.check import (
    MIN_TIMED_STEPS,
    RL_ITERATIONS,
    STAGES,
    TRAINING_STAGES,
    Stage,
    run_stages,
    training_figures,
)
from tests.conftest import REPO


@pytest.mark.slow
def test_the_gpu_check_runs_every_stage_on_the_cpu(tmp_path):
    command = [sys.executable, str(REPO / "benchmarks/gpu/check.py"), "--out", str(tmp_path), "--smoke"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    results = json.loads((tmp_path / "results.json").read_text())
    assert "pretrain_4k_ga8" in results and all(results[stage]["status"] == "ok" for stage in STAGES), results
    for stage in TRAINING_STAGES:
        result = results[stage]
        assert result["timed_steps"] >= MIN_TIMED_STEPS and result["steps"] == result["timed_steps"] + 1, result
        assert result["tokens_per_s"] > 0 and result["estimate_gib"] > 0
        assert (tmp_path / f"{stage}.log").exists()
    rl = results["rl"]
    assert rl["iterations"] == RL_ITERATIONS == 2 and rl["timed_iteration"] == 2 and len(rl["warmup"]) == 1
    assert rl["time/update"] > 0 and "reward_mean" in rl
    table = (tmp_path / "summary.md").read_text()
    assert all(f"| {stage} |" in table for stage in TRAINING_STAGES) and "| rl: RLVR iteration 2 of 2 |" in table


def sleeper(name: str, seconds: float, budget_s: float) -> Stage:
    command = [sys.executable, "-c", f"import time; print('started', flush=True); time.sleep({seconds})"]
    return Stage(name, "training", command, budget_s, lambda: {})


def test_a_stage_over_its_budget_is_recorded_and_the_next_one_runs(tmp_path):
    stages = [sleeper("slow", 60, budget_s=1), sleeper("next", 0, budget_s=30)]
    run_stages(stages, tmp_path, {"device": "test", "date": "today"}, started=0.0)
    results = json.loads((tmp_path / "results.json").read_text())
    slow, after = results["slow"], results["next"]
    assert slow["status"] == "timed_out" and 1 <= slow["seconds"] < 30, slow
    assert "budget of 1 s" in slow["reason"] and "started" in slow["log_tail"]
    assert after["status"] == "ok", after
    table = (tmp_path / "summary.md").read_text()
    assert "| slow | timed out: over its budget of 1 s; see slow.log |" in table and "| next |" in table


def metrics_rows(data_wait: bool) -> list[dict]:
    """Four steps of 4,096 tokens: a slow first one (5 s), then 1 s each, a quarter of it waiting for data."""
    rows = []
    for step, seconds in enumerate((5.0, 1.0, 1.0, 1.0), start=1):
        row = {"step": step, "loss": 1.0, "step_tokens": 4096, "tokens_per_s": 4096 / seconds}
        rows.append(row | ({"time/data_wait": 0.25 * seconds} if data_wait else {}))
    return rows


@pytest.mark.parametrize("data_wait", [True, False])
def test_training_figures_are_medians_over_the_timed_steps(tmp_path, data_wait):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in metrics_rows(data_wait)))
    figures = training_figures(path, warmup=1)
    assert figures["timed_steps"] == 3 and figures["step_s"] == pytest.approx(1.0) and figures["tokens_per_s"] == 4096
    assert figures["data_wait_share"] == (pytest.approx(0.25) if data_wait else None)
