import pytest
import torch

from rl.algos.advantages import compute_advantages, gae, grpo, reinforce_pp, rloo, terminal_rewards, uniform_groups
from rl.algos.losses import GlobalCounts, aggregate, explained_variance, policy_loss, value_loss

MASK = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1], [1, 0, 0, 0]])


def test_terminal_reward_sits_on_the_last_response_token():
    token_rewards = terminal_rewards(torch.tensor([1.0, 2.0, 3.0]), MASK)
    assert token_rewards.tolist() == [[0, 0, 1, 0], [0, 0, 0, 2], [3, 0, 0, 0]]


def test_gae_with_unit_gamma_and_lambda_is_reward_minus_value():
    rewards, values = torch.tensor([1.0, 0.0, 0.5]), torch.rand(3, 4)
    advantages, returns = gae(rewards, values, MASK)
    assert torch.allclose(advantages, (rewards[:, None] - values) * MASK)
    assert torch.allclose(returns, rewards[:, None] * MASK)


def test_gae_matches_its_definition_for_other_gamma_and_lambda():
    gamma, lam = 0.9, 0.8
    rewards, values = torch.tensor([1.0, -1.0, 0.5]), torch.rand(3, 4)
    advantages, _ = gae(rewards, values, MASK, gamma, lam)
    for b in range(3):
        n = int(MASK[b].sum())
        r = [0.0] * (n - 1) + [float(rewards[b])]
        v = values[b, :n].tolist() + [0.0]
        deltas = [r[t] + gamma * v[t + 1] - v[t] for t in range(n)]
        for t in range(n):
            expected = sum((gamma * lam) ** k * deltas[t + k] for k in range(n - t))
            assert advantages[b, t].item() == pytest.approx(expected, abs=1e-5)
        assert advantages[b, n:].abs().sum() == 0


def test_group_estimators():
    rewards, groups = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0]), torch.tensor([0, 0, 0, 0, 1, 1])
    assert torch.allclose(grpo(rewards, groups, scale_by_std=False), torch.tensor([0.5, -0.5, -0.5, 0.5, 0, 0]))
    std = torch.tensor([1.0, 0, 0, 1]).std()
    assert torch.allclose(grpo(rewards, groups)[:4], torch.tensor([0.5, -0.5, -0.5, 0.5]) / (std + 1e-6))
    # leave-one-out: 1 - mean(0, 0, 1) = 2/3; 0 - mean(1, 0, 1) = -2/3
    assert torch.allclose(rloo(rewards, groups), torch.tensor([2 / 3, -2 / 3, -2 / 3, 2 / 3, 0, 0]))
    assert uniform_groups(rewards, groups).tolist() == [False] * 4 + [True] * 2
    assert rloo(torch.tensor([1.0, 0.0]), torch.tensor([0, 1])).tolist() == [0.0, 0.0]  # no baseline, no signal


def test_reinforce_pp_is_whitened_over_response_tokens():
    advantages = reinforce_pp(torch.tensor([1.0, 0.0, 1.0]), torch.tensor([0, 0, 1]), MASK)
    tokens = advantages[MASK.bool()]
    assert tokens.mean().abs() < 1e-6 and tokens.std(unbiased=False) == pytest.approx(1, abs=1e-4)
    assert advantages[~MASK.bool()].abs().sum() == 0


def test_critic_free_advantages_cover_only_response_tokens():
    advantages, returns = compute_advantages("grpo", torch.tensor([1.0, 0.0, 1.0]), MASK, torch.tensor([0, 0, 1]))
    assert returns is None and advantages[~MASK.bool()].abs().sum() == 0
    with pytest.raises(ValueError, match="critic"):
        compute_advantages("gae", torch.tensor([1.0, 0.0, 1.0]), MASK, torch.tensor([0, 0, 1]))
    with pytest.raises(ValueError, match="estimator"):
        compute_advantages("ppo2", torch.tensor([1.0, 0.0, 1.0]), MASK, torch.tensor([0, 0, 1]))


@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-sum", "seq-mean-token-mean"])
def test_aggregation_does_not_depend_on_the_split(mode):
    losses = torch.rand(3, 4)
    counts = GlobalCounts(tokens=int(MASK.sum()), sequences=3)
    whole = aggregate(losses, MASK, mode, counts)
    parts = aggregate(losses[:2], MASK[:2], mode, counts) + aggregate(losses[2:], MASK[2:], mode, counts)
    assert whole.item() == pytest.approx(parts.item())
    expected = {
        "token-mean": (losses * MASK).sum() / MASK.sum(),
        "seq-mean-token-sum": (losses * MASK).sum(1).mean(),
        "seq-mean-token-mean": ((losses * MASK).sum(1) / MASK.sum(1)).mean(),
    }[mode]
    assert whole.item() == pytest.approx(expected.item())


def test_policy_loss_clips_and_truncates_importance_weights():
    counts = GlobalCounts(tokens=2, sequences=1)
    mask = torch.ones(1, 2)
    old = torch.log(torch.tensor([[0.5, 0.5]]))
    new = torch.log(torch.tensor([[0.9, 0.5]]))  # ratio 1.8 on the first token, 1 on the second
    advantages = torch.ones(1, 2)
    loss, stats = policy_loss(new, old, old, advantages, mask, counts, tis_cap=None)
    assert loss.item() == pytest.approx(-(1.2 + 1.0) / 2)  # the first token's ratio clipped to 1.2
    assert stats["clip_fraction"].item() == 1
    # the engine gave the first token 1/20 of the trainer's probability: weight min(20, 8) = 8
    rollout = old - torch.tensor([[torch.log(torch.tensor(20.0)), 0.0]])
    weighted, _ = policy_loss(new, old, rollout, advantages, mask, counts, tis_cap=8.0)
    assert weighted.item() == pytest.approx(-(8 * 1.2 + 1.0) / 2)
    # a negative advantage is not clipped from below when the ratio grows
    loss, _ = policy_loss(new, old, old, -advantages, mask, counts, tis_cap=None)
    assert loss.item() == pytest.approx((1.8 + 1.0) / 2)


def test_policy_gradient_points_towards_advantaged_tokens():
    logits = torch.zeros(1, 2, 3, requires_grad=True)
    logprobs = torch.log_softmax(logits, -1).gather(-1, torch.tensor([[[0], [1]]])).squeeze(-1)
    loss, _ = policy_loss(
        logprobs,
        logprobs.detach(),
        logprobs.detach(),
        torch.tensor([[1.0, -1.0]]),
        torch.ones(1, 2),
        GlobalCounts(2, 1),
    )
    loss.backward()
    assert logits.grad[0, 0, 0] < 0 and logits.grad[0, 1, 1] > 0  # descent raises token 0, lowers token 1


def test_value_loss_and_explained_variance():
    counts = GlobalCounts(tokens=int(MASK.sum()), sequences=3)
    returns = torch.tensor([1.0, 0.0, 1.0])[:, None] * MASK
    assert value_loss(returns.clone(), returns, returns, MASK, counts).item() == 0
    values = torch.full((3, 4), 0.5)
    assert value_loss(values, values, returns, MASK, counts).item() == pytest.approx(0.125)
    clipped = value_loss(values, torch.zeros(3, 4), returns, MASK, counts, clip=0.1)
    assert clipped.item() > 0.125  # the clipped prediction (0.1) is further from 1, and the max takes it
    assert explained_variance(returns, returns, MASK) == 1.0
    assert explained_variance(values * MASK, returns, MASK) < 1.0
