"""A weight sync whose engine fails inside its update: the run names the engine in one message and restarts
from its latest checkpoint; one that hangs is ended at `rollout.sync_timeout_s`, and a run out of restarts
stops with its checkpoint named. The faults are injected into the transformers engine's actors by
tests/rl/sync_faults/sitecustomize.py."""

import subprocess
import time

import pytest

from tests.conftest import REPO
from tests.rl.test_rl_run import command, environment, rows

DEADLINE_S = 10


@pytest.mark.slow
def test_a_failed_sync_restarts_and_a_hung_one_ends_at_its_deadline(secret_task, tmp_path):
    prompts, model = secret_task
    faults = tmp_path / "faults"
    faults.write_text("ok\nraise\nhang\n")  # the syncs after steps 1, 2 and (after the restart) 2 again
    out = tmp_path / "run"
    settings = [f"prompts.train={prompts}/*.tar", f"policy.init_from={model}", "algo.estimator=grpo",
                "critic.enabled=false", "prompts.prompts_per_step=4", "rollout.n=2", "algo.minibatches=2",
                "rollout.max_new_tokens=8", "policy.micro_batch_tokens=512", "trainer.max_steps=3",
                "trainer.save_every=1", "trainer.max_restarts=1", f"rollout.sync_timeout_s={DEADLINE_S}"]  # fmt: skip
    env = {**environment(), "PYTHONPATH": f"{REPO / 'tests' / 'rl' / 'sync_faults'}:{REPO}", "SYNC_FAULTS": str(faults)}
    started = time.monotonic()
    done = subprocess.run(command(out, *settings), capture_output=True, text=True, timeout=600, env=env, cwd=REPO)
    elapsed = time.monotonic() - started
    assert done.returncode == 1, done.stderr[-5000:]
    assert faults.read_text() == ""  # every fault was met
    lines = done.stderr.splitlines()
    # The failure inside the update: named at once, and the run goes on from step 1's checkpoint.
    [restart] = [line for line in lines if "restarting from the latest checkpoint (1/1)" in line]
    assert "the weight sync after step 2 failed on a training rank" in restart
    assert "rollout engine 0 (pid " in restart and "load_weights: RuntimeError: CUDA out of memory (injected" in restart
    assert "resumed from step 1" in done.stderr
    # The hang: ended at the deadline, the engine named, the checkpoint to resume from given.
    [error] = [line for line in lines if line.startswith("error: ")]
    hung = f"the weight sync after step 2 did not end within rollout.sync_timeout_s={DEADLINE_S} s: rollout engine 0"
    assert hung in error and "does not answer" in error, error
    latest = out / "checkpoints" / "step_1"
    resumes = f"Re-running the same command resumes from {latest} (step 1)."
    assert error.endswith(f"Stopping after trainer.max_restarts=1. {resumes}"), error
    assert (out / "checkpoints" / "latest").read_text() == "step_1"
    assert [row["step"] for row in rows(out / "metrics.jsonl")] == [1]
    assert elapsed < 300, elapsed  # not the engine's hour-long hang
