"""On the transformers engine an RL run repeats exactly: the same command twice gives the same metrics,
bit for bit, iteration after iteration (rollouts, rewards, the critic's values, losses, gradient norms)."""

import pytest

from tests.rl.test_rl_run import SECRET, run

# Figures that measure the machine, not the run.
MACHINE = ("time/", "sync/s", "sync_start/s", "service/")


def deterministic(row: dict) -> dict:
    return {key: value for key, value in row.items() if not key.startswith(MACHINE)}


@pytest.mark.slow
def test_ppo_with_a_critic_repeats_bit_for_bit(secret_task, tmp_path):
    prompts, model = secret_task
    settings = [*SECRET, f"prompts.train={prompts}/*.tar", f"policy.init_from={model}", "prompts.prompts_per_step=4",
                "rollout.n=4", "rollout.max_new_tokens=12", "trainer.max_steps=3"]  # fmt: skip
    first = run(tmp_path / "first", *settings)
    second = run(tmp_path / "second", *settings)
    assert [row["step"] for row in first] == [1, 2, 3]
    assert all(row["value_loss"] is not None for row in first)  # the critic, whose new value head was unseeded
    assert [deterministic(row) for row in first] == [deterministic(row) for row in second]
