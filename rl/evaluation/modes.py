"""The two ways a problem is answered (spec 5.8), each turning a batch of problems into results.jsonl lines:
`sere`, `samples` independent responses; `pacore`, `samples` independent PaCoRe runs (rl/pacore/inference.py),
whose responses are their syntheses. Both are scored by RLVR's rewards, as PaCoRe inference scores them."""

from __future__ import annotations

import random
from typing import Any

from rl.chat_models import ChatModel, ChatReply, ChatRequest
from rl.pacore.config import PaCoReConfig
from rl.pacore.inference import PaCoReInference, Problem, response_text, reward_record, reward_request
from rl.rewards import RewardResult, RewardScorer

RUN_FIELDS = ("rounds", "syntheses", "skipped", "sere_rewards")  # of a PaCoRe result; its final is a response


def response_record(reply: ChatReply | None, reward: RewardResult | None) -> dict[str, Any]:
    """A response as results.jsonl keeps it: the whole text (reasoning, `</think>`, answer), how it ended,
    and its score and status (rl/pacore/inference.py, reward_record). None: a PaCoRe run skipped over
    budget, which answered nothing."""
    if reply is None:
        return {"text": None, "finish_reason": None, "score": 0.0, "status": "skipped"}
    return {"text": response_text(reply), "finish_reason": reply.finish_reason, **reward_record(reward, reply)}


def line(problem: Problem, mode: str, responses: list[dict[str, Any]]) -> dict[str, Any]:
    sample = problem.sample
    return {"key": sample.key, "mode": mode, "reward": sample.reward, "answer": sample.answer, "responses": responses}


class SeRe:
    name = "sere"

    def __init__(self, model: ChatModel, scorer: RewardScorer, samples: int, seed: int):
        self.model, self.scorer, self.samples, self.seed = model, scorer, samples, seed
        self.calls = 0

    def run(self, problems: list[Problem], batch: int) -> list[dict[str, Any]]:
        """`batch` seeds the hf engine's sampling."""
        requests = [ChatRequest(problem.sample.messages, problem.sample.images) for problem in problems]
        seed = random.Random(f"{self.seed}:sere:{batch}").randrange(2**31)
        replies = self.model.complete(requests, self.samples, seed)
        self.calls += self.samples * len(requests)
        jobs = [
            (row, column, reward_request(problem, reply, problem.sample.reward))
            for row, (problem, group) in enumerate(zip(problems, replies, strict=True))
            for column, reply in enumerate(group)
        ]
        jobs = [job for job in jobs if job[2] is not None]  # failed calls: nothing to score
        rewards: list[list[RewardResult | None]] = [[None] * self.samples for _ in problems]
        for (row, column, _), result in zip(jobs, self.scorer.score([job[2] for job in jobs]), strict=True):
            rewards[row][column] = result
        return [
            line(problem, self.name, [response_record(r, s) for r, s in zip(group, scores, strict=True)])
            for problem, group, scores in zip(problems, replies, rewards, strict=True)
        ]


class PaCoRe:
    name = "pacore"

    def __init__(self, config: PaCoReConfig, model: ChatModel, tokenizer, scorer: RewardScorer, samples: int):
        self.inference = PaCoReInference(config, model, tokenizer, scorer)
        self.samples = samples

    @property
    def calls(self) -> int:
        return self.inference.calls

    def run(self, problems: list[Problem], batch: int) -> list[dict[str, Any]]:
        """Each problem's runs go through the rounds together with the batch's; `batch` seeds the hf engine."""
        traces = self.inference.traces([problem for problem in problems for _ in range(self.samples)], batch)
        lines = []
        for index, problem in enumerate(problems):
            runs = traces[index * self.samples : (index + 1) * self.samples]
            responses = [
                response_record(None if trace.skipped else trace.rounds[-1][0], trace.pacore_reward) for trace in runs
            ]
            results = [self.inference.result(trace) for trace in runs]
            lines.append(
                {**line(problem, self.name, responses), "runs": [{k: r[k] for k in RUN_FIELDS} for r in results]}
            )
        return lines
