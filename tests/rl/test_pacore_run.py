"""`python rl/run.py stage=pacore` end to end on the CPU, on the PaCoRe form of the secret-digit task
(tests/rl/format_task.py): each prompt's secret only its message pool tells."""

import os
import signal
import subprocess

import pytest

from rl.prompts import prompt_loader
from tests.conftest import REPO
from tests.rl.compose import compose_rl
from tests.rl.test_rl_run import TINY, command, environment, rows, wait_for

# 8 prompts x 8 synthesis rollouts an iteration, 4-8 messages each from pools of 8 (6 box the secret).
SETTINGS = [
    "prompts.prompts_per_step=8", "rollout.n=8", "algo.minibatches=2", "policy.micro_batch_tokens=4096",
    "critic.micro_batch_tokens=4096", "rollout.max_new_tokens=24", "policy.optim.lr=5e-4", "critic.optim.lr=1e-3",
    "trainer.max_steps=16", "trainer.save_every=4",
]  # fmt: skip


def mean(values):
    return sum(values) / len(values)


@pytest.mark.slow
def test_synthesis_learns_to_read_its_messages_and_a_killed_run_draws_the_same_ones(
    pacore_task, tiny_processor, tmp_path
):
    """The run is SIGKILLed after step 5 (checkpoint: step 4) and re-run: every prompt of every step gets
    exactly the messages the loader draws for (seed, step, key), the re-run step 5 the ones it had before
    the kill. The synthesis reward rises, and ends above the same run's given no messages."""
    prompts, model = pacore_task
    settings = [f"prompts.train={prompts}/*.tar", f"policy.init_from={model}", "pacore.messages=[4,8]", *SETTINGS]
    loader = prompt_loader(compose_rl("stage=pacore", *TINY, *settings), tiny_processor)
    expected = [(step, p.key, p.synthesis.indices) for step in range(1, 17) for p in loader.next_batch(8, step)]

    out = tmp_path / "pacore"
    run_command = command(out, *settings, stage="pacore")
    process = subprocess.Popen(run_command, env=environment(), start_new_session=True, cwd=REPO,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    wait_for(lambda: len(rows(out / "metrics.jsonl")) >= 5, process)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    assert (out / "checkpoints" / "latest").read_text() == "step_4"
    before_kill = [(r["step"], r["key"], r["messages"]) for r in rows(out / "rollouts.jsonl") if r["step"] == 5]
    done = subprocess.run(run_command, env=environment(), cwd=REPO, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0 and "resumed from step 4" in done.stderr, done.stderr[-5000:]

    logged = [(r["step"], r["key"], r["messages"]) for r in rows(out / "rollouts.jsonl")]
    assert logged == expected
    assert before_kill == [row for row in logged if row[0] == 5] and len(before_kill) == 8
    metrics = rows(out / "metrics.jsonl")
    assert [row["step"] for row in metrics] == list(range(1, 17))
    synthesis = [row["pacore/synthesis_reward"] for row in metrics]
    assert all(0.6 < row["pacore/message_reward"] < 0.9 and 4 <= row["pacore/messages"] <= 8 for row in metrics)
    # The rise over 16 steps is ~0.07 against a noise of ~0.03 between two halves' means (64 rollouts a
    # step), so a half-on-half rise is what is asserted; the gap to the run without messages is the margin.
    assert mean(synthesis[8:]) > mean(synthesis[:8]), synthesis

    bare = tmp_path / "no_messages"
    # Half as long: with no messages there is nothing to learn, the secret being the prompt's own.
    done = subprocess.run(command(bare, *settings, "pacore.messages=[0,0]", "trainer.max_steps=8", stage="pacore"),
                          env=environment(), cwd=REPO, capture_output=True, text=True, timeout=900)  # fmt: skip
    assert done.returncode == 0, done.stderr[-5000:]
    baseline = [row["pacore/synthesis_reward"] for row in rows(bare / "metrics.jsonl")]
    assert all(row["messages"] == [] for row in rows(bare / "rollouts.jsonl"))  # the bare problem, every time
    assert len(baseline) == 8 and mean(synthesis[-3:]) >= max(baseline) + 0.1, (synthesis, baseline)
