"""Sequence parallelism in RL (policy/critic.sequence_parallel): 2 ranks sharing every row (DeepSpeed
Ulysses over gloo) score and update as one rank does, to 1e-5 in fp32: log-probs, values, entropy, losses and
every gradient, on image and text prompts, a row a response and shared rows, cached features and pixels
(tests/rl/sequence_parallel_run.py); and the driver's shares give a group's ranks the same responses."""

from types import SimpleNamespace

import pytest
import torch

from rl.experience import Completion, Response
from rl.iteration import minibatches, rank_shares
from step3vl_train.model import Step3VLForConditionalGeneration
from tests.conftest import load_model_config
from tests.rl.ranks import run_ranks
from tests.rl.sequence_parallel_run import RUNS


def test_a_groups_ranks_hold_the_same_responses_counted_once():
    responses = [Response(i // 4, None, Completion([1] * (i + 1), [0.0] * (i + 1), "stop")) for i in range(16)]
    shares = rank_shares(responses, 4, 2)
    assert shares[0] == shares[1] == responses[:8] and shares[2] == shares[3] == responses[8:]
    cfg = SimpleNamespace(
        trainer=SimpleNamespace(seed=0), sequence_parallel=2, algo=SimpleNamespace(minibatches=2, epochs=1)
    )
    shards, counts = minibatches(cfg, responses, step=3, world=4)
    assert shards[0] == shards[1] and shards[2] == shards[3] and len(shards[0]) == 8
    assert sum(c.sequences for c in counts) == 16 and sum(c.tokens for c in counts) == sum(range(1, 17))


@pytest.mark.slow
def test_two_ranks_sharing_each_row_compute_what_one_rank_does(tmp_path):
    torch.manual_seed(0)
    Step3VLForConditionalGeneration(load_model_config("tiny")).save_pretrained(tmp_path / "init")
    results = {}
    for world in (1, 2):
        out = tmp_path / f"world{world}"
        out.mkdir()
        (out / "world").write_text(str(world))
        run_ranks("tests.rl.sequence_parallel_run", out, timeout=600, world=world)
        results[world] = [torch.load(out / f"rank{rank}.pt", weights_only=False) for rank in range(world)]
    [reference] = results[1]
    for rank, got in enumerate(results[2]):
        for name in RUNS:
            run, expected = got[name], reference[name]
            assert run["decoded"] <= 0.55 * expected["decoded"]  # each rank's decoder takes half of every row
            for key in ("old_logprobs", "values"):
                for a, b in zip(run[key], expected[key], strict=True):
                    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=f"rank {rank} {name}: {key}")
            assert run["entropy_sum"] == pytest.approx(expected["entropy_sum"], rel=1e-5)
            for key in ("policy_loss", "value_loss", "clip_tokens", "approx_kl"):
                assert run["sums"][key] == pytest.approx(expected["sums"][key], rel=1e-5, abs=1e-6), (rank, name, key)
            for role in ("policy", "critic"):
                assert len(run["grads"][role]) == 2  # a step a minibatch
                for step, (a, b) in enumerate(zip(run["grads"][role], expected["grads"][role], strict=True)):
                    assert any(g.abs().max() > 0 for g in b.values())
                    for param in b:
                        torch.testing.assert_close(
                            a[param], b[param], rtol=1e-5, atol=1e-6, msg=f"rank {rank} {name}: {role} {step} {param}"
                        )
