"""The driver's own work in an iteration, between the actors' calls: rewards for the responses, their
advantages and the iteration's metrics, and the minibatches each training rank takes. No Ray here, so
that one iteration can also run in one process (benchmarks/gpu/rl_iteration.py)."""

from __future__ import annotations

import json
import random
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import torch

from rl.algos.advantages import compute_advantages
from rl.algos.losses import GlobalCounts, explained_variance
from rl.config import RLConfig
from rl.engines import SamplingParams
from rl.experience import Completion, Prompt, Response
from rl.rewards import RewardRequest, RewardScorer
from step3vl_train.processing.processor import Step3VLProcessor

STOP_TOKENS = ("<|im_end|>", "<|endoftext|>")


def sampling_params(cfg: RLConfig, processor: Step3VLProcessor) -> SamplingParams:
    """The rollout settings (`rollout.*`)."""
    rollout = cfg.rollout
    return chat_sampling(
        processor, rollout.n, rollout.temperature, rollout.max_new_tokens, rollout.top_p, rollout.top_k
    )


def chat_sampling(
    processor: Step3VLProcessor, n: int, temperature: float, max_new_tokens: int, top_p: float = 1.0, top_k: int = 0
) -> SamplingParams:
    """Sampling for an assistant turn (a rollout, or a GenRM judge's reply): generation stops at the end of
    the turn, and never writes an image token."""
    vocab = processor.tokenizer.get_vocab()
    return SamplingParams(
        n=n,
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        max_new_tokens=max_new_tokens,
        stop_token_ids=[vocab[token] for token in STOP_TOKENS if token in vocab],
        suppressed_token_ids=sorted(set(vars(processor.image_token_ids).values())),
    )


def group_responses(prompts: list[Prompt], completions: list[list[Completion]]) -> list[Response]:
    """One Response per completion, grouped by prompt in order (group = the prompt's index)."""
    return [
        Response(group=index, prompt=prompt, completion=completion)
        for index, (prompt, group) in enumerate(zip(prompts, completions, strict=True))
        for completion in group
    ]


def score_rewards(scorer: RewardScorer, responses: list[Response], decode, stop_token_ids: list[int]) -> None:
    """Each response's reward, status and validity, from its text without the stop token."""
    requests = [
        RewardRequest(
            response=decode([t for t in r.completion.token_ids if t not in stop_token_ids]),
            reward=r.prompt.reward,
            answer=r.prompt.answer,
            boxes=r.prompt.boxes,
            points=r.prompt.points,
            image_size=r.prompt.image_size,
            truncated=r.completion.finish_reason == "length",
            prompt=r.prompt.question,
            messages=r.prompt.original_messages or r.prompt.messages,  # PaCoRe: the problem, not the template
            images=r.prompt.images,
            reference=r.prompt.reference,
        )
        for r in responses
    ]
    for response, result in zip(responses, scorer.score(requests), strict=True):
        response.reward, response.status, response.valid = result.score, result.status, result.valid
        response.components = result.components


def advantages(cfg: RLConfig, responses: list[Response], entropy_sum: float) -> dict:
    """Advantages and returns into the responses; the iteration's reward and length metrics, and where the
    scoring pass gave old log-probs (not in an on-policy update, `RLConfig.on_policy_update`) the entropy
    and mismatch ones. `entropy_sum`: the policy's entropy summed over the valid response tokens."""
    length = max(r.length for r in responses)
    mask = torch.zeros(len(responses), length)
    for i, r in enumerate(responses):
        mask[i, : r.length] = float(r.valid)
    values = None
    if cfg.uses_critic:
        values = torch.zeros(len(responses), length)
        for i, r in enumerate(responses):
            values[i, : r.length] = r.values
    valid = torch.tensor([r.valid for r in responses])
    rewards = torch.tensor([r.reward for r in responses])
    groups = torch.tensor([r.group if r.valid else -1 - i for i, r in enumerate(responses)])
    advantage, returns = compute_advantages(
        cfg.algo.estimator, rewards, mask, groups, values, cfg.algo.gamma, cfg.algo.lam, cfg.algo.grpo_scale_by_std
    )
    for i, r in enumerate(responses):
        r.advantages = advantage[i, : r.length]
        r.returns = returns[i, : r.length] if returns is not None else torch.zeros(r.length)
    tokens = int(mask.sum())
    row = {
        "reward_mean": float(rewards[valid].mean()) if valid.any() else 0.0,
        "pass_rate": float((rewards[valid] >= 1.0).float().mean()) if valid.any() else 0.0,
        "response_len_mean": float(np.mean([r.length for r in responses])),
        "response_len_max": max(r.length for r in responses),
        "truncated_fraction": float(np.mean([r.completion.finish_reason == "length" for r in responses])),
        "explained_variance": explained_variance(values, returns, mask) if values is not None else None,
        "tokens": tokens,
        "samples": len(responses) // cfg.rollout.n,
    }
    by_task = defaultdict(list)
    for r in responses:
        if r.valid:
            by_task[r.prompt.task].append(r.reward)
    row |= {f"reward/{task}": float(np.mean(scores)) for task, scores in sorted(by_task.items())}
    row |= component_means(responses)
    row |= synthesis_metrics(responses)
    row |= {f"reward_status/{k}": v for k, v in sorted(Counter(r.status for r in responses).items())}
    valid = [r for r in responses if r.valid]
    if all(r.old_logprobs is not None for r in valid):
        engine = torch.cat([torch.tensor(r.completion.logprobs) for r in valid] or [torch.zeros(0)])
        gap = (engine - torch.cat([r.old_logprobs for r in valid] or [torch.zeros(0)])).abs()
        behind = torch.cat([r.behind_mask() for r in valid] or [torch.zeros(0)]).bool()
        fresh, older = gap[~behind], gap[behind]
        sums = {"mismatch_sum": float(fresh.sum()), "mismatch_max": float(fresh.max()) if len(fresh) else 0.0,
                "mismatch_tokens": len(fresh), "gap_sum": float(older.sum()), "gap_tokens": len(older)}  # fmt: skip
        row |= logprob_metrics(entropy_sum, tokens, sums)
    return row


# What the update sums where no scoring pass gave the old log-probs (`logprob_metrics`).
LOGPROB_SUMS = ("entropy_sum", "mismatch_sum", "mismatch_max", "mismatch_tokens", "gap_sum", "gap_tokens")


def logprob_metrics(entropy_sum: float, tokens: int, sums: dict[str, float]) -> dict[str, float]:
    """The policy's mean entropy over the `tokens` valid response tokens; and its log-probs' distance from
    the engine's, |engine - trainer|: over the tokens the trained version sampled, the engine's numerics
    (`logprob_mismatch/*`: `mismatch_sum`, its largest `mismatch_max`, over `mismatch_tokens`), and over
    those an older version sampled, how far the policy has moved from them (`staleness/logprob_gap`:
    `gap_sum` over `gap_tokens`). Each where there are such tokens."""
    row = {"entropy": entropy_sum / max(tokens, 1)}
    if sums["mismatch_tokens"]:
        row["logprob_mismatch/mean_abs"] = sums["mismatch_sum"] / sums["mismatch_tokens"]
        row["logprob_mismatch/max_abs"] = sums["mismatch_max"]
    if sums["gap_tokens"]:
        row["staleness/logprob_gap"] = sums["gap_sum"] / sums["gap_tokens"]
    return row


# Components of the reward-model service's rewards that are not 0-1 parts of a reward, and their metric names.
COMPONENT_METRICS = {
    "position_disagreement": "genrm/position_disagreement",  # the share of pairs whose two orders disagree
    "citations": "citations/found",  # per response
    "fabricated_citations": "citations/fabricated",
    "rm/raw": "reward_model/raw",  # the scalar RM's unnormalised score
}


def component_means(responses: list[Response]) -> dict[str, float]:
    """The mean of each reward component (the reward-model service's parts of a reward: `rm`, `genrm`,
    `language`, ...) over the valid responses that have it, as `reward/<component>`; COMPONENT_METRICS
    names the rest."""
    values = defaultdict(list)
    for r in responses:
        if r.valid:
            for name, value in r.components.items():
                values[name].append(value)
    return {COMPONENT_METRICS.get(name, f"reward/{name}"): float(np.mean(v)) for name, v in sorted(values.items())}


def synthesis_metrics(responses: list[Response]) -> dict[str, float]:
    """PaCoRe: the synthesis's reward beside the mean reward of the messages it was given (per prompt, over
    the prompts whose messages carry rewards), so a run shows whether the synthesis beats its inputs; and
    the messages a prompt was given."""
    prompts = {id(r.prompt): r.prompt for r in responses if r.prompt.synthesis is not None}
    if not prompts:
        return {}
    valid = [r.reward for r in responses if r.valid and r.prompt.synthesis is not None]
    given = [p.synthesis.message_reward for p in prompts.values() if p.synthesis.message_reward is not None]
    row = {
        "pacore/synthesis_reward": float(np.mean(valid)) if valid else 0.0,
        "pacore/messages": float(np.mean([len(p.synthesis.indices) for p in prompts.values()])),
        "pacore/dropped_over_budget": sum(p.synthesis.dropped.get("over_budget", 0) for p in prompts.values()),
    }
    if given:
        row["pacore/message_reward"] = float(np.mean(given))
    return row


def log_rollouts(path: Path, step: int, responses: list[Response], n: int, shown: int, decode) -> None:
    """Appends to `rollouts.jsonl` every prompt of the iteration with its rewards, and the text of the first
    `shown` responses."""
    with path.open("a") as handle:
        for start in range(0, len(responses), n):
            group = responses[start : start + n]
            row = {
                "step": step,
                "key": group[0].prompt.key,
                "task": group[0].prompt.task,
                "answer": group[0].prompt.answer,
                "rewards": [r.reward for r in group],
                "statuses": [r.status for r in group],
            }
            if group[0].prompt.synthesis is not None:
                row["messages"] = group[0].prompt.synthesis.indices
            if start < shown:
                row["responses"] = [decode(r.completion.token_ids) for r in group[: shown - start]]
            handle.write(json.dumps(row) + "\n")


def rank_shares(responses: list[Response], world: int, sequence_parallel: int = 1) -> list[list[Response]]:
    """Each training rank's responses for the whole iteration, scoring and update: equal consecutive runs,
    so that a prompt's responses (consecutive) sit on as few ranks as possible, each of which computes the
    prompt's image features once (rl/feature_cache.py) and runs their prompt once a row (algo.shared_prompt).
    The `sequence_parallel` consecutive ranks of a group share one run (they split its rows, not its
    responses)."""
    groups = world // sequence_parallel
    per_group = len(responses) // groups
    return [responses[(rank // sequence_parallel) * per_group :][:per_group] for rank in range(world)]


def minibatches(
    cfg: RLConfig, responses: list[Response], step: int, world: int
) -> tuple[list[list[Response]], list[GlobalCounts]]:
    """Each rank's share (`rank_shares`) shuffled (seeded by the run's seed and `step`) and cut into
    `algo.minibatches` equal slices; minibatch m is the m-th slice of every rank, so a rank trains on the
    responses it scored, as verl's ranks do. Returns each rank's slices in order (every epoch's), and the
    global counts of valid tokens and responses of each minibatch (each sequence-parallel group's once)."""
    rng = random.Random(cfg.trainer.seed * 1_000_003 + step)
    size = cfg.sequence_parallel
    shares = [list(share) for share in rank_shares(responses, world // size)]  # a sequence-parallel group's
    for share in shares:
        rng.shuffle(share)
    per_rank = len(responses) // (cfg.algo.minibatches * len(shares))
    shards: list[list[Response]] = [[] for _ in shares]
    counts = []
    for _ in range(cfg.algo.epochs):
        for m in range(cfg.algo.minibatches):
            slices = [share[m * per_rank : (m + 1) * per_rank] for share in shares]
            trained = [r for part in slices for r in part if r.trained_tokens]
            counts.append(GlobalCounts(tokens=sum(r.trained_tokens for r in trained), sequences=len(trained)))
            for group, part in enumerate(slices):
                shards[group] += part
    return [shards[rank // size] for rank in range(world)], counts
