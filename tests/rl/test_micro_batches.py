"""RL micro-batches by a token budget (rl/micro_batches.py): the split itself, a loss and gradient that do not
depend on it, and TrainWorker over 2 ZeRO-3 ranks (gloo) making as many forwards as the rank that needs
the most and one optimizer step a minibatch, at its last micro-batch.

The 2-rank part runs this file as a script, one process a rank:
python -m tests.rl.test_micro_batches RANK PORT OUT_DIR
"""

import random
import sys
from pathlib import Path

import pytest
import torch

from rl.algos.losses import AGGREGATIONS, GlobalCounts, policy_loss
from rl.experience import Completion, Prompt, Response, sequence_batch
from rl.micro_batches import count_micro_batches, padded_tokens, response_rows, shared_row_length, split_micro_batches
from tests.rl.ranks import run_ranks

REPO = Path(__file__).resolve().parents[2]


def check_split(lengths, budget, count):
    groups = split_micro_batches(lengths, budget, count)
    assert len(groups) == count and all(groups)
    assert sorted(i for g in groups for i in g) == list(range(len(lengths)))  # every row once
    for g in groups:
        assert padded_tokens([lengths[i] for i in g]) <= budget or len(g) == 1
    return groups


def test_the_fewest_forwards_under_the_budget_and_a_longer_row_alone():
    assert count_micro_batches([100] * 4, 400) == 1
    assert count_micro_batches([100] * 4, 399) == 2
    assert count_micro_batches([], 10) == 0
    # a row longer than the budget is a forward of its own; the rest still share
    assert check_split([500, 10, 10, 10], 100, 2) == [[0], [1, 2, 3]]
    # rows of similar length go together: the long pair, the short pair (not long + short twice)
    assert sorted(check_split([100, 10, 100, 10], 400, 2)) == [[0, 2], [1, 3]]


def test_any_count_from_the_fewest_to_one_row_each():
    rng = random.Random(0)
    for _ in range(50):
        lengths = [rng.randint(1, 300) for _ in range(rng.randint(1, 40))]
        budget = rng.randint(50, 1500)
        fewest = count_micro_batches(lengths, budget)
        largest = []
        for count in range(fewest, len(lengths) + 1):
            groups = check_split(lengths, budget, count)
            largest.append(max(padded_tokens([lengths[i] for i in g]) for g in groups))
        assert largest == sorted(largest, reverse=True)  # more forwards never make the largest larger
        for bad in (fewest - 1, len(lengths) + 1):
            if bad >= 0:
                with pytest.raises(ValueError, match="micro-batches"):
                    split_micro_batches(lengths, budget, bad)


def test_the_largest_forward_is_balanced():
    # 3 forwards of 6 rows of 100: 2 rows each, where filling the first two to a budget of 300 would
    # leave 3 + 3 + 0 (and then cut one of them)
    groups = check_split([100] * 6, 300, 3)
    assert sorted(len(g) for g in groups) == [2, 2, 2]


def fake_responses(lengths, prompt_sample, seed=0, per_prompt=1):
    """Responses of these lengths, `per_prompt` consecutive ones to each prompt (all of them the same
    sample), with log-probs and advantages to train on."""
    generator = torch.Generator().manual_seed(seed)
    responses = []
    for index, length in enumerate(lengths):
        tokens = torch.randint(11, 1000, (length,), generator=generator).tolist()
        rollout = (-torch.rand(length, generator=generator) * 3).tolist()
        group = index // per_prompt
        prompt = Prompt(f"k{group}", "t", prompt_sample, [], [], "math")
        response = Response(group, prompt, Completion(tokens, rollout, "stop"), valid=index % 5 != 4)
        response.old_logprobs = torch.tensor(rollout) + 0.1 * torch.randn(length, generator=generator)
        response.advantages = torch.randn(length, generator=generator)
        response.values = torch.randn(length, generator=generator)
        response.returns = torch.randn(length, generator=generator)
        responses.append(response)
    return responses


def global_counts(responses):
    valid = [r for r in responses if r.valid]
    return GlobalCounts(tokens=sum(r.length for r in valid), sequences=len(valid))


@pytest.mark.parametrize("aggregation", AGGREGATIONS)
def test_the_policy_loss_and_its_gradient_do_not_depend_on_the_budget(tiny_model, tiny_processor, aggregation):
    """The loss of every micro-batch divided by the minibatch's counts: the sum over micro-batches and the
    accumulated gradient are the same whether the responses run in 1, 3 or 7 forwards (a row each)."""
    sample = tiny_processor([{"role": "user", "content": "Say the secret digit."}], add_generation_prompt=True)
    responses = fake_responses([3, 40, 7, 25, 12, 33, 9], sample)
    counts = global_counts(responses)
    lengths = [len(sample.input_ids) + r.length for r in responses]
    results = {}
    for budget in (10_000, 150, 1):
        tiny_model.zero_grad()
        count = count_micro_batches(lengths, budget)
        total = 0.0
        for group in split_micro_batches(lengths, budget, count):
            chunk = [responses[i] for i in group]
            sequences = sequence_batch([(r.prompt.sample, r.completion.token_ids) for r in chunk], 0)
            out = tiny_model(
                **sequences.batch.model_inputs(with_labels=False),
                labels=sequences.response_labels(),
                logprobs_temperature=1.0,
            )
            mask = sequences.response_mask * torch.tensor([[float(r.valid)] for r in chunk])
            loss, _ = policy_loss(
                out.logprobs[:, :-1],
                sequences.scatter([r.old_logprobs for r in chunk]),
                sequences.scatter([torch.tensor(r.completion.logprobs) for r in chunk]),
                sequences.scatter([r.advantages for r in chunk]),
                mask,
                counts,
                aggregation=aggregation,
            )
            loss.backward()
            total += loss.item()
        grads = {name: p.grad.clone() for name, p in tiny_model.named_parameters() if p.grad is not None}
        results[budget] = (count, total, grads)
    assert [results[b][0] for b in (10_000, 150, 1)] == [1, 3, 7]
    _, reference_loss, reference = results[10_000]
    assert any(g.abs().sum() > 0 for g in reference.values())
    for budget in (150, 1):
        _, total, grads = results[budget]
        assert total == pytest.approx(reference_loss, rel=1e-5, abs=1e-7)
        assert grads.keys() == reference.keys()
        for name, grad in grads.items():
            torch.testing.assert_close(grad, reference[name], rtol=1e-4, atol=1e-7, msg=f"{budget}: {name}")


# ---- TrainWorker over 2 ranks -----------------------------------------------------------------------------

# Response lengths of each rank's share of 2 minibatches (one 25-token prompt: rows are 25 longer). Under a
# budget of 200 tokens, minibatch 0 needs 3 forwards on rank 0 and 2 on rank 1; minibatch 1 needs 2 and 1.
SHARES = {
    0: [[155, 125, 15, 10, 5, 5], [70, 65, 5, 5, 5, 5]],
    1: [[35, 30, 25, 20, 15, 5], [8, 8, 8, 5, 5, 3]],
}
SMALL, LARGE = 200, 1_000_000
OVERRIDES = [
    "stage=rlvr", "model=tiny", "processor=tiny", "tokenizer=tiny", "prompts.train=unused.tar",
    "prompts.prompts_per_step=6", "rollout.n=4", "algo.minibatches=2", "algo.estimator=gae",
    # Adam's first step is lr x g / (|g| + eps): with eps far above |g| the update is the gradient itself
    # (no clipping), so equal updates mean equal gradients
    "policy.optim.lr=1000", "policy.optim.eps=1000", "policy.grad_clip=0",
    "critic.optim.lr=1000", "critic.optim.eps=1000", "critic.grad_clip=0",
]  # fmt: skip


def partition(engine) -> torch.Tensor:
    """This rank's ZeRO-3 partition of every parameter, flat."""
    return torch.cat([p.ds_tensor.detach().float().flatten() for p in engine.module.parameters()])


def record_backwards(engine) -> list[int]:
    """The engine's optimizer steps so far at each of its backward passes, from now on."""
    trace, backward = [], engine.backward

    def counted(*args, **kwargs):
        trace.append(engine.global_steps)
        return backward(*args, **kwargs)

    engine.backward = counted
    return trace


def forwards_needed(lengths, budget, shared):
    """This rank's forwards for a share (a 25-token prompt to each 3 consecutive responses), before agreeing."""
    rows = response_rows([i // 3 for i in range(len(lengths))], [25] * len(lengths), lengths, budget, shared)
    return count_micro_batches([shared_row_length(25, [lengths[i] for i in row]) for row in rows], budget)


def rank_main(rank: int, port: int, out: Path) -> None:
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from rl.workers.train import TrainWorker
    from step3vl_train.processing.processor import load_processor
    from step3vl_train.train.recipes import register_recipes

    register_recipes()
    with initialize_config_dir(str(REPO / "configs"), version_base="1.3"):
        config = OmegaConf.to_container(compose("rl", OVERRIDES), resolve=True)
    torch.manual_seed(0)
    worker = TrainWorker(rank, 2, "127.0.0.1", port, config, pad_token_id=0)
    processor = load_processor("tiny", str(REPO / "configs/processor/tiny.yaml"))
    sample = processor([{"role": "user", "content": "Say the secret digit."}], add_generation_prompt=True)
    assert len(sample.input_ids) == 25
    minibatches = [
        [fake_responses(SHARES[r][m], sample, seed=10 * m + r, per_prompt=3) for r in range(2)] for m in range(2)
    ]  # [minibatch][rank]
    counts = [global_counts(minibatches[m][0] + minibatches[m][1]) for m in range(2)]
    mine = minibatches[0][rank] + minibatches[1][rank]
    engines = {"policy": worker.policy.engine, "critic": worker.critic.engine}
    initial = {name: partition(engine) for name, engine in engines.items()}
    worker.save(str(out / "initial"))
    results = {}
    for budget, shared in ((LARGE, False), (SMALL, False), (SMALL, True)):
        worker.load(str(out / "initial"))
        assert all(torch.equal(partition(engine), initial[name]) for name, engine in engines.items())
        worker.cfg.algo.shared_prompt = shared
        for role in (worker.cfg.policy, worker.cfg.critic):
            role.micro_batch_tokens = budget
        stats = worker.score(mine, 1.0)
        traces = {name: record_backwards(engine) for name, engine in engines.items()}
        sums = worker.update(mine, counts)
        results[budget, shared] = {
            "old_logprobs": stats.old_logprobs,
            "values": stats.values,
            "entropy_sum": stats.entropy_sum,
            "sums": sums,
            "traces": traces,
            "global_steps": {name: engine.global_steps for name, engine in engines.items()},
            "moved": {name: partition(engine) - initial[name] for name, engine in engines.items()},
            "needed": [forwards_needed(share, budget, shared) for share in SHARES[rank]],
        }
        for engine in engines.values():
            del engine.backward  # the class's again
    torch.save(results, out / f"rank{rank}.pt")
    worker.close()


@pytest.mark.slow
def test_two_ranks_step_once_a_minibatch_and_any_budget_gives_the_same_update(tmp_path):
    """Rank 0 needs 3 forwards for minibatch 0 where rank 1 needs 2, and 2 for minibatch 1 where rank 1
    needs 1: both make 3 then 2 (else ZeRO-3's gathers hang), the optimizer steps after the 3rd and after
    the 5th backward only (DeepSpeed's own count, or a step every micro-batch, would step elsewhere), and
    the scores, losses and parameter updates equal those of one forward a minibatch. So do they with each
    prompt's responses in shared rows (algo.shared_prompt), a group split over rows where the budget cuts."""
    run_ranks("tests.rl.test_micro_batches", tmp_path, timeout=300)
    for rank in range(2):
        results = torch.load(tmp_path / f"rank{rank}.pt", weights_only=False)
        large = results[LARGE, False]
        for shared in (False, True):
            small = results[SMALL, shared]
            assert small["needed"] == ([3, 2] if rank == 0 else [2, 1])
            for name in ("policy", "critic"):
                assert large["traces"][name] == [0, 1], name  # one forward a minibatch
                assert small["traces"][name] == [0, 0, 0, 1, 1], name  # 3 then 2 forwards, a step after each set
                assert small["global_steps"][name] == large["global_steps"][name] == 2
                assert small["moved"][name].abs().max() > 1e-4
                torch.testing.assert_close(small["moved"][name], large["moved"][name], rtol=1e-4, atol=1e-6)
            for key in ("old_logprobs", "values"):
                for got, expected in zip(small[key], large[key], strict=True):
                    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
            assert small["entropy_sum"] == pytest.approx(large["entropy_sum"], rel=1e-5)
            for key, value in large["sums"].items():
                assert small["sums"][key] == pytest.approx(value, rel=1e-4, abs=1e-6), (shared, key)


if __name__ == "__main__":
    rank_main(int(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3]))
