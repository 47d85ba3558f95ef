"""`python rl/run.py stage=rlvr|rlhf` end to end on the CPU: Ray actors, 2 ZeRO-3 training ranks (gloo), the
transformers rollout engine, rewards in worker processes or from the reward-model service."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from rl.prompts import PromptLoader
from tests.conftest import REPO
from tests.rl.compose import compose_rl
from tests.rl.test_validation import HELD_OUT, write_held_out

TINY = ["model=tiny", "processor=tiny", "tokenizer=tiny", "logging.mode=disabled"]
# The secret-digit task: 8 prompts x 8 responses an iteration, 2 minibatches over 2 ranks.
SECRET = [
    "prompts.prompts_per_step=8", "rollout.n=8", "algo.minibatches=2", "policy.micro_batch_tokens=1024",
    "critic.micro_batch_tokens=1024", "rollout.max_new_tokens=24", "policy.optim.lr=5e-4", "critic.optim.lr=1e-3",
]  # fmt: skip


def command(out, *overrides, stage="rlvr"):
    return [sys.executable, str(REPO / "rl" / "run.py"), f"stage={stage}", *TINY, f"trainer.output_dir={out}",
            *overrides]  # fmt: skip


def environment():
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "RAY_DEDUP_LOGS": "0"}


def run(out, *overrides):
    done = subprocess.run(command(out, *overrides), capture_output=True, text=True, timeout=900, env=environment())
    assert done.returncode == 0, done.stderr[-5000:]
    return rows(out / "metrics.jsonl")


def rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def prompt_keys(out):
    return [(row["step"], row["key"]) for row in rows(out / "rollouts.jsonl")]


def wait_for(predicate, process, timeout=300):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert process.poll() is None, process.stderr.read()[-5000:] if process.stderr else "exited"
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.2)


def wait_for_group_to_end(group, timeout=60):
    """Until no process of the process group `group` is left (Ray's, the service's, the actors)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            os.killpg(group, 0)
        except ProcessLookupError:
            return
        left = subprocess.run(["pgrep", "-a", "-g", str(group)], capture_output=True, text=True).stdout
        assert time.monotonic() < deadline, f"left running: {left}"
        time.sleep(0.5)


@pytest.mark.slow
def test_a_sigtermed_rlhf_driver_and_a_dead_rank_lose_and_repeat_no_prompt(
    rlhf_corpus, tiny_reward_model, secret_task, tiny_processor, tmp_path
):
    """RLHF one step off-policy (algo.max_staleness=1: each checkpoint holds the next batch, generated during
    its update), its reward-model service started inside the run. The driver gets SIGTERM after step 3 (as a
    container's stop reaches its main process): it finishes the iteration in flight, saves it, shuts Ray
    and the service down (nothing of its process group is left) and exits with 143 and the resume line. The
    re-run command starts the service again and resumes, then loses a training rank and replaces it from the
    latest checkpoint. The prompts the run trained on are exactly the loader's sequence: none lost, none
    twice; every response was scored by the service."""
    # The secret-digit task's policy ends its responses in a few tokens: the service scores them (a response
    # cut at the length limit is scored by the truncation rule, never sent).
    settings = [f"prompts.root={rlhf_corpus}", f"policy.init_from={secret_task[1]}", "prompts.prompts_per_step=4",
                "rollout.n=2", "algo.minibatches=2", "policy.micro_batch_tokens=512", "critic.micro_batch_tokens=512",
                "rollout.max_new_tokens=16", "trainer.max_steps=6", "trainer.save_every=2", "algo.max_staleness=1",
                "reward.require_reasoning=false", f"reward.service.server.rm.scalar.model={tiny_reward_model}",
                "reward.service.server.rm.scalar.processor=configs/processor/tiny.yaml"]  # fmt: skip
    loader = PromptLoader(compose_rl("stage=rlhf", *TINY, *settings).prompts, tiny_processor)
    expected = [(step, prompt.key) for step in range(1, 7) for prompt in loader.next_batch(4)]
    assert len({key for _, key in expected}) == 24

    out = tmp_path / "run"
    run_command = command(out, *settings, stage="rlhf")
    process = subprocess.Popen(run_command, env=environment(), start_new_session=True, cwd=REPO,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)  # fmt: skip
    wait_for(lambda: len(rows(out / "metrics.jsonl")) >= 3, process)  # past the checkpoint of step 2
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=300)
    stopped = rows(out / "metrics.jsonl")[-1]["step"]  # the iteration in flight when the signal came, finished
    assert process.returncode == 143 and stopped in (3, 4), stderr[-5000:]
    assert (out / "checkpoints" / "latest").read_text() == f"step_{stopped}"
    resumes = f"Re-running the same command resumes from {out / 'checkpoints' / f'step_{stopped}'} (step {stopped})."
    assert f"\nstopped by SIGTERM at step {stopped} (of 6). {resumes}\n" in stderr, stderr[-5000:]
    wait_for_group_to_end(process.pid)

    process = subprocess.Popen(run_command, env=environment(), start_new_session=True, cwd=REPO,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)  # fmt: skip
    wait_for(lambda: len(rows(out / "metrics.jsonl")) > stopped, process)
    os.kill(json.loads((out / "actors.json").read_text())["train"][1], signal.SIGKILL)
    _, stderr = process.communicate(timeout=600)
    assert process.returncode == 0, stderr[-5000:]
    assert "resumed from" in stderr and "restarting from the latest checkpoint" in stderr
    metrics = rows(out / "metrics.jsonl")
    assert [row["step"] for row in metrics] == list(range(1, 7))
    assert prompt_keys(out) == expected
    scored = [row for row in metrics if "reward/rm" in row]
    assert len(scored) >= 3 and all(0 <= row["reward/rm"] <= 1 and row["service/latency_p50"] > 0 for row in scored)
    failures = ("timeout", "error", "unparsed")
    assert not any(f"reward_status/{status}" in row for row in metrics for status in failures)


@pytest.mark.slow
def test_critic_free_grpo_with_dynamic_sampling_and_validation(secret_task, tmp_path):
    """GRPO with dynamic sampling, validated on held-out prompts (tests/rl/test_validation.py) before training,
    at step 2 and at the last step, 2 responses of at most 12 tokens each: its rollouts stay out of the batch.
    Rollouts one step off-policy with partial rollouts (threaded engine actors, paused for each sync)."""
    prompts, model = secret_task
    metrics = run(tmp_path / "run", *SECRET, f"prompts.train={prompts}/*.tar", f"policy.init_from={model}",
                  "algo.estimator=grpo", "critic.enabled=false", "algo.drop_uniform_groups=true", "rollout.n=4",
                  "policy.micro_batch_tokens=512", "trainer.max_steps=3", write_held_out(tmp_path / "held_out"),
                  "trainer.eval_every=2", "trainer.eval_before_train=true", "rollout.eval.n=2",
                  "rollout.eval.max_new_tokens=12", "algo.max_staleness=1", "rollout.partial=true")  # fmt: skip
    assert [row["step"] for row in metrics] == [0, 1, 2, 3]
    trained = metrics[1:]
    assert all(row["value_loss"] is None and row["explained_variance"] is None for row in trained)
    # batch 1 by version 0; batch 2 begun during update 1 (by version 0), trained by version 1
    assert trained[0]["staleness/max"] == 0 and trained[1]["staleness/max"] >= 1
    # two in three groups of 4 guesses at 1 in 10 all fail: they are dropped and more prompts drawn
    assert sum(row["dropped_groups"] for row in trained) > 0
    logged = rows(tmp_path / "run" / "rollouts.jsonl")
    assert len(logged) == 3 * 8  # the batch is refilled (from set-aside groups after the last round)
    assert all(row["samples"] == 8 for row in trained) and not any("held-" in row["key"] for row in logged)
    mixed = sum(len(set(row["rewards"])) > 1 for row in logged)
    assert mixed > sum(row["dropped_groups"] == 0 for row in trained)  # more mixed groups than chance leaves
    evaluated = [row for row in metrics if "eval/pass@1" in row]
    assert [row["step"] for row in evaluated] == [0, 2, 3] and "reward_mean" not in metrics[0]
    for row in evaluated:
        assert (row["eval/prompts"], row["eval/responses"]) == (5, 10) and row["eval/response_len_mean"] <= 12
        assert all(0 <= row[f"eval/{figure}/{source}"] <= 1 for figure in ("reward", "pass@1") for source in HELD_OUT)
