"""PaCoRe inference (spec 6.2), behind `launch/pacore.py`: for each problem, K_1 parallel rollouts of the problem
as it is; each later round a synthesis of the previous round's conclusions (the rendered template replaces
the text of the last user message, its images and earlier turns kept); the last round, of width 1, is the
answer. `pacore.rounds` lists the widths before that last round: [16] is 16 rollouts then the synthesis.

A round's rollouts are compacted as in training (`messages.py`): failed, empty and (by default) unfinished
ones are dropped and counted, never rendered as empty references; when none is left the synthesis is the
bare problem (the template is bypassed, as the spec says for M = {}), counted as `no_messages`; under
`pacore.over_budget=skip` a problem whose references do not fit gets no synthesis, and its result says so.

The rounds of `batch_problems` problems run together: round r of the batch is one `complete` call of the
chat model. With a `reward` (and `answer`) in the data, the first round's rollouts (SeRe) and the synthesis
(PaCoRe) are scored by the verifiable rewards of RLVR, side by side.
"""

from __future__ import annotations

import itertools
import json
import os
import random
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import MISSING
from tqdm import tqdm

from rl.chat_models import ChatModel, ChatModelConfig, ChatReply, ChatRequest
from rl.pacore.config import PaCoReConfig
from rl.pacore.messages import Compactor, Rollout, official_order, seeded_order
from rl.pacore.template import conclusion, original_prompt, synthesis_messages
from rl.prompts import question_text, sample_images
from rl.rewards import RewardConfig, RewardRequest, RewardResult, RewardScorer
from step3vl_train.data.config import SourceConfig
from step3vl_train.data.mixed import MixedSamples
from step3vl_train.data.schema import Sample
from step3vl_train.data.skips import SkippedSample
from step3vl_train.data.sources import is_local, record_key, resolve_shards
from step3vl_train.processing.chat import THINK_END, split_reasoning
from step3vl_train.usage import UsageError


def chat_defaults() -> ChatModelConfig:
    """SeRe's sampling (spec 4, 5.8): temperature and top-p 1, replies of up to 65,536 tokens."""
    return ChatModelConfig(backend="hf", max_new_tokens=65536, temperature=1.0, top_p=1.0)


@dataclass
class ProblemsConfig:
    # Prompt shards (webdataset .tar: paths, globs, brace ranges), JSONL files (*.jsonl) or saved HF datasets
    # (a directory), in the sample schema (docs/data.md); one path or a list.
    paths: Any = MISSING
    image_dir: str | None = None  # JSONL: where its `images` are; default: beside the file

    def check(self) -> None:
        """`paths` as a list. Called by the config that holds this one: a default of a nested dataclass is
        built with its paths still missing."""
        if isinstance(self.paths, str):
            self.paths = [self.paths]
        if not self.paths or not all(isinstance(path, str) for path in self.paths):
            raise ValueError(f"data must be a path or a list of paths, not {self.paths!r}")


@dataclass
class InferenceConfig:
    chat: ChatModelConfig = field(default_factory=chat_defaults)
    data: ProblemsConfig = field(default_factory=ProblemsConfig)
    out: str = "outputs/pacore"  # results.jsonl, summary.json
    max_problems: int | None = None  # None: every problem, each read once
    batch_problems: int = 16  # problems whose rounds run together (one chat call a round)
    pacore: PaCoReConfig = field(default_factory=PaCoReConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)

    def __post_init__(self) -> None:
        self.data.check()
        if self.batch_problems < 1:
            raise ValueError(f"batch_problems must be positive, not {self.batch_problems}")
        if self.max_problems is not None and self.max_problems < 1:
            raise ValueError(f"max_problems must be positive or null, not {self.max_problems}")


@dataclass
class Problem:
    sample: Sample
    image_size: tuple[int, int] | None  # (width, height) of the first image, for the perception rewards


@dataclass
class Trace:
    """One problem's way through the rounds."""

    problem: Problem
    messages: list[dict[str, Any]]  # the conversation of the next round
    rounds: list[list[ChatReply]] = field(default_factory=list)
    syntheses: list[dict[str, Any]] = field(default_factory=list)  # the references each synthesis was given
    skipped: str | None = None  # "over_budget": no synthesis
    sere_rewards: list[RewardResult | None] | None = None  # the first round's, None for a failed call
    pacore_reward: RewardResult | None = None  # the synthesis's


def response_text(reply: ChatReply) -> str | None:
    """The whole response as the engines write it (reasoning, `</think>`, conclusion), from a reply whose
    server split the reasoning off; None when the call failed. A reply cut while reasoning (no content) is
    its reasoning alone: unfinished."""
    if reply.status != "ok":
        return None
    if reply.reasoning is None:
        return reply.text or ""
    if reply.text is None:
        return reply.reasoning
    return reply.reasoning + THINK_END + reply.text


def problem_sources(config: ProblemsConfig) -> list[SourceConfig]:
    """A source per path: JSONL by its suffix, a saved HF dataset when a directory, shards otherwise. A local
    path that names no file is a UsageError (a missing shard would otherwise only be a counted skip)."""
    sources = []
    for index, path in enumerate(config.paths):
        kind = "jsonl" if path.endswith(".jsonl") else "hf" if os.path.isdir(path) else "webdataset"
        source = SourceConfig(f"data{index}", [path], kind=kind, image_dir=config.image_dir)
        try:  # the readers' own expansion of brace ranges and globs
            missing = [url for url in resolve_shards(source, None) if is_local(url) and not os.path.exists(url)]
        except FileNotFoundError as error:
            raise UsageError(f"data: {path} names no file") from error
        if missing:
            raise UsageError(f"data: {path if missing[0] == path else f'{path}: {missing[0]}'} names no file")
        sources.append(source)
    return sources


def read_problem(sample: Sample, source: str) -> Problem:
    if sample.messages is None or sample.messages[-1]["role"] != "user":
        raise SkippedSample("bad_schema", sample.key, "a problem needs `messages` ending with a user turn")
    images = sample_images(sample)
    return Problem(sample, images[0].size if images else None)


class PaCoReInference:
    def __init__(
        self, pacore: PaCoReConfig, model: ChatModel, tokenizer, scorer: RewardScorer, reward_fn: str | None = None
    ):
        """`reward_fn` (reward.fn) scores every problem; None: each sample's own `reward`."""
        self.pacore = pacore
        self.model = model
        self.compactor = Compactor(pacore, tokenizer)
        self.scorer = scorer
        self.reward_fn = reward_fn
        self.widths = [*pacore.rounds, 1]
        self.calls = 0

    def run(self, problems: list[Problem], batch: int) -> list[dict[str, Any]]:
        """The problems' results (results.jsonl lines), in order; `batch` seeds the `hf` engine's sampling."""
        return [self.result(trace) for trace in self.traces(problems, batch)]

    def traces(self, problems: list[Problem], batch: int) -> list[Trace]:
        """The problems through the rounds, scored; `batch` seeds the `hf` engine's sampling."""
        traces = [Trace(problem, problem.sample.messages) for problem in problems]
        for round_index, width in enumerate(self.widths):
            active = [trace for trace in traces if trace.skipped is None]
            if not active:
                break
            requests = [ChatRequest(trace.messages, trace.problem.sample.images) for trace in active]
            seed = random.Random(f"{self.pacore.seed}:{batch}:{round_index}").randrange(2**31)
            replies = self.model.complete(requests, width, seed)
            self.calls += width * len(requests)
            for trace, group in zip(active, replies, strict=True):
                trace.rounds.append(group)
                if round_index < len(self.widths) - 1:
                    self.compact(trace, round_index)
        self.score(traces)
        return traces

    def compact(self, trace: Trace, round_index: int) -> None:
        """The next round's conversation from the last round's replies."""
        group, sample = trace.rounds[-1], trace.problem.sample
        rollouts = [Rollout(response_text(reply), reply.finish_reason) for reply in group]
        if self.pacore.order == "official":
            # The official order sorts every reply, failed ones as empty strings, by its content as returned.
            order = official_order([reply.text or "" for reply in group])
        else:
            order = seeded_order(len(group), self.pacore.seed, record_key(sample.key), round_index)
        problem = original_prompt(sample.messages)
        references = self.compactor.from_rollouts(problem, rollouts, order)
        trace.syntheses.append(
            {
                "references": [order[position] for position in references.kept],  # the replies, in their order
                "dropped": dict(references.dropped),
                "capped": references.capped,
                "no_messages": not references.texts and not references.skipped,  # the bare problem
            }
        )
        if references.skipped:
            trace.skipped = "over_budget"
            return
        trace.messages = synthesis_messages(sample.messages, references.texts)

    def score(self, traces: list[Trace]) -> None:
        """The rewards of the first round's rollouts and of the synthesis, into the traces of problems with a
        reward, in one scorer call; a failed call is not scored."""
        jobs = []  # (trace, the rollout's position in the first round, or None for the synthesis, its request)
        for trace in traces:
            reward = self.reward_fn or trace.problem.sample.reward
            if reward is None:
                continue
            trace.sere_rewards = [None] * len(trace.rounds[0])
            for position, reply in enumerate(trace.rounds[0]):
                jobs.append((trace, position, reward_request(trace.problem, reply, reward)))
            if trace.skipped is None:
                jobs.append((trace, None, reward_request(trace.problem, trace.rounds[-1][0], reward)))
        jobs = [job for job in jobs if job[2] is not None]
        results = self.scorer.score([request for _, _, request in jobs]) if jobs else []
        for (trace, position, _), result in zip(jobs, results, strict=True):
            if position is None:
                trace.pacore_reward = result
            else:
                trace.sere_rewards[position] = result

    def result(self, trace: Trace) -> dict[str, Any]:
        sample = trace.problem.sample
        result: dict[str, Any] = {
            "key": sample.key,
            "answer": sample.answer,
            "rounds": [[reply_record(reply) for reply in group] for group in trace.rounds],
            "syntheses": trace.syntheses,
            "skipped": trace.skipped,
            "final": None,
        }
        if trace.skipped is None:
            final = trace.rounds[-1][0]
            text = response_text(final)
            result["final"] = {
                "text": final.text,
                "reasoning": final.reasoning if final.reasoning is not None else split_reasoning(text or "")[0],
                "conclusion": None if text is None else conclusion(text),
                "status": final.status,
                "finish_reason": final.finish_reason,
            }
        if trace.sere_rewards is not None:
            result["sere_rewards"] = [
                reward_record(reward, reply) for reward, reply in zip(trace.sere_rewards, trace.rounds[0], strict=True)
            ]
            result["pacore_reward"] = (
                {"score": 0.0, "status": "skipped"}  # no answer: wrong, as a failed call is
                if trace.skipped
                else reward_record(trace.pacore_reward, trace.rounds[-1][0])
            )
        return result


def reward_request(problem: Problem, reply: ChatReply, reward: str) -> RewardRequest | None:
    """`reply` to `problem` as RLVR scores a rollout (rl/iteration.py, score_rewards), by the reward named
    `reward`, against the problem as stored (a synthesis is judged as an answer to the problem, not to the
    template); None for a failed call."""
    text = response_text(reply)
    if text is None:
        return None
    sample = problem.sample
    return RewardRequest(
        response=text,
        reward=reward,
        answer=sample.answer,
        boxes=sample.boxes,
        points=sample.points,
        image_size=problem.image_size,
        truncated=reply.finish_reason == "length",
        prompt=question_text(sample.messages),
        messages=sample.messages,
        images=sample.images,
        reference=sample.reference,
    )


def reply_record(reply: ChatReply) -> dict[str, Any]:
    text = response_text(reply)
    return {
        "conclusion": None if text is None else conclusion(text),
        "finished": Rollout(text, reply.finish_reason).finished,
        "status": reply.status,
        "finish_reason": reply.finish_reason,
    }


def reward_record(result: RewardResult | None, reply: ChatReply) -> dict[str, Any]:
    """{score, status}. A failed call answered nothing: 0, as the official code's empty answer scores. A
    scorer failure (timeout, error) is no verdict on the model: its score is None, left out of accuracy."""
    if result is None:
        return {"score": 0.0, "status": reply.status}
    return {"score": result.score if result.valid else None, "status": result.status}


class Summary:
    """What summary.json and the final printed line hold."""

    def __init__(self):
        self.problems = 0
        self.sere: list[float] = []
        self.pacore: list[float] = []
        self.dropped: Counter[str] = Counter()
        self.no_messages = 0
        self.skipped: Counter[str] = Counter()

    def add(self, result: dict[str, Any]) -> None:
        self.problems += 1
        for synthesis in result["syntheses"]:
            self.dropped.update(synthesis["dropped"])
            self.no_messages += synthesis["no_messages"]
        if result["skipped"]:
            self.skipped[result["skipped"]] += 1
        self.sere += [r["score"] for r in result.get("sere_rewards", []) if r["score"] is not None]
        pacore = result.get("pacore_reward")
        if pacore is not None and pacore["score"] is not None:
            self.pacore.append(pacore["score"])

    def row(self, calls: int, data_skips: Counter[str], seconds: float) -> dict[str, Any]:
        return {
            "problems": self.problems,
            "calls": calls,
            "sere_accuracy": sum(self.sere) / len(self.sere) if self.sere else None,
            "sere_scored": len(self.sere),
            "pacore_accuracy": sum(self.pacore) / len(self.pacore) if self.pacore else None,
            "pacore_scored": len(self.pacore),
            "dropped": dict(self.dropped),
            "no_messages": self.no_messages,
            "skipped": dict(self.skipped),
            "data_skips": dict(data_skips),
            "seconds": round(seconds, 3),
        }


def run_inference(config: InferenceConfig, model: ChatModel, tokenizer) -> dict[str, Any]:
    """Every problem through the rounds; writes `out`/results.jsonl and summary.json; returns the summary."""
    start = time.monotonic()
    samples = MixedSamples(problem_sources(config.data), None, seed=config.pacore.seed, max_epochs=1)
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    scorer = RewardScorer(config.reward)
    inference = PaCoReInference(config.pacore, model, tokenizer, scorer, config.reward.fn)
    summary = Summary()
    progress = tqdm(total=config.max_problems, desc="problems", unit="problem")
    try:
        with (out / "results.jsonl").open("w") as results:
            for batch in itertools.count():
                left = config.batch_problems
                if config.max_problems is not None:
                    left = min(left, config.max_problems - summary.problems)
                problems = samples.take(left, read_problem, "problem") if left > 0 else []
                if not problems:
                    break
                for result in inference.run(problems, batch):
                    results.write(json.dumps(result) + "\n")
                    summary.add(result)
                results.flush()
                progress.update(len(problems))
    finally:
        progress.close()
        scorer.close()
    row = summary.row(inference.calls, samples.skips, time.monotonic() - start)
    (out / "summary.json").write_text(json.dumps(row, indent=1) + "\n")
    return row
