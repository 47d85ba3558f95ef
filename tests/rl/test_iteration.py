"""The driver's own phases (rl/iteration.py): a truncated response's reward and how truncation is counted,
the metrics that come from a scoring pass, and each rank training on the responses it scored."""

import pytest
import torch

from rl.config import RLConfig
from rl.experience import Completion, Prompt, Response
from rl.iteration import advantages, logprob_metrics, minibatches, rank_shares, score_rewards
from rl.rewards import RewardConfig, RewardScorer

# token ids stand for characters here: the "tokenizer" decodes them with chr
RIGHT, WRONG = "Some reasoning.</think>\\boxed{3}", "Some reasoning.</think>\\boxed{4}"


def config(**algo) -> RLConfig:
    return RLConfig.from_dict(
        {
            "prompts": {"train": "unused.tar", "prompts_per_step": 4},
            "rollout": {"n": 4},
            "algo": {"estimator": "grpo", "minibatches": 2, **algo},
            "trainer": {"world_size": 2},
        }
    )


def responses(texts_and_reasons, groups=1):
    out = []
    for group in range(groups):
        prompt = Prompt(f"k{group}", "math", None, [], [], "math", answer="3")
        for text, reason in texts_and_reasons:
            ids = [ord(c) for c in text]
            out.append(Response(group, prompt, Completion(ids, [-0.5] * len(ids), reason)))
    return out


@pytest.mark.parametrize("truncated_score", [0.0, None])
def test_truncated_responses_are_counted_whatever_scores_them(truncated_score):
    batch = responses([(RIGHT, "length"), (WRONG, "length"), (RIGHT, "stop"), (WRONG, "stop")], groups=4)
    scorer = RewardScorer(RewardConfig(num_workers=1, truncated_score=truncated_score))
    try:
        score_rewards(scorer, batch, lambda ids: "".join(map(chr, ids)), [])
    finally:
        scorer.close()
    assert [r.reward for r in batch[:4]] == ([0.0, 0.0, 1.0, 0.0] if truncated_score == 0.0 else [1.0, 0.0, 1.0, 0.0])
    for r in batch:
        r.old_logprobs = torch.full((r.length,), -0.5)
    row = advantages(config(), batch, entropy_sum=0.0)
    assert row["truncated_fraction"] == 0.5
    assert row.get("reward_status/truncated") == (8 if truncated_score == 0.0 else None)


def test_scoring_metrics_only_from_a_scoring_pass():
    """Without the scoring pass's log-probs (an on-policy update) the driver takes the entropy and the
    mismatch from the update (logprob_metrics of its sums); with them, advantages gives the same figures."""
    batch = responses([(RIGHT, "stop"), (WRONG, "stop")] * 2, groups=4)
    for r in batch:
        r.reward = float(r.completion.token_ids[-2] == ord("3"))
    row = advantages(config(minibatches=1), batch, entropy_sum=0.0)
    assert "entropy" not in row and "logprob_mismatch/mean_abs" not in row
    for i, r in enumerate(batch):
        r.old_logprobs = torch.full((r.length,), -0.5 + 0.01 * (i % 3))
    row = advantages(config(), batch, entropy_sum=64.0)
    tokens = sum(r.length for r in batch)
    gaps = sum(0.01 * (i % 3) * r.length for i, r in enumerate(batch))
    expected = logprob_metrics(64.0, tokens, {"mismatch_sum": gaps, "mismatch_max": 0.02, "mismatch_tokens": tokens,
                                              "gap_sum": 0.0, "gap_tokens": 0})  # fmt: skip
    assert row["entropy"] == pytest.approx(expected["entropy"])
    assert row["logprob_mismatch/mean_abs"] == pytest.approx(expected["logprob_mismatch/mean_abs"], rel=1e-5)
    assert row["logprob_mismatch/max_abs"] == pytest.approx(0.02, rel=1e-5)


def test_each_rank_trains_on_the_responses_it_scored():
    cfg = config(epochs=2)
    batch = responses([(RIGHT, "stop"), (WRONG, "stop"), (RIGHT, "length"), (WRONG, "stop")], groups=4)
    batch[5].valid = False
    shares = rank_shares(batch, 2)
    assert [r.group for r in shares[0]] == [0] * 4 + [1] * 4  # a prompt's responses on one rank
    shards, counts = minibatches(cfg, batch, step=3, world=2)
    assert len(counts) == 4  # 2 minibatches x 2 epochs
    for rank in range(2):
        assert len(shards[rank]) == 2 * 8
        first_epoch = shards[rank][:8]
        assert sorted(map(id, first_epoch)) == sorted(map(id, shares[rank]))  # its own, each once an epoch
        assert shards[rank][8:] == first_epoch
    per_rank = 4  # of each minibatch
    for m in range(2):
        members = shards[0][m * per_rank : (m + 1) * per_rank] + shards[1][m * per_rank : (m + 1) * per_rank]
        valid = [r for r in members if r.valid]
        assert (counts[m].sequences, counts[m].tokens) == (len(valid), sum(r.length for r in valid))
    assert sum(c.sequences for c in counts[:2]) == 15
    assert list(map(id, minibatches(cfg, batch, step=4, world=2)[0][0])) != list(map(id, shards[0]))  # reshuffled
