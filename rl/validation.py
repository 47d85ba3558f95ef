"""Validation during RL: the held-out prompts of `prompts.eval`, rolled out on the run's engines with
`rollout.eval`'s sampling and scored by the run's rewards, every `trainer.eval_every` iterations, at the
last one and, with `trainer.eval_before_train`, once before the first (step 0). The driver rolls them out
and scores them; this module says when, which prompts, with what sampling, and what the figures are. The
responses go into the step's metrics row and nowhere else: not into advantages, minibatches or the update.

Each evaluation reads its prompts afresh, so every one is on the same prompts and leaves the training
loader as it was. It runs after the step's weight sync (the engines hold the step's policy) and before the
step's checkpoint, so that a resumed run neither repeats nor skips one."""

from __future__ import annotations

import sys
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np

from rl.config import PromptsConfig, RLConfig
from rl.engines import SamplingParams
from rl.experience import Prompt, Response
from rl.iteration import chat_sampling
from rl.prompts import PromptLoader
from step3vl_train.processing.processor import Step3VLProcessor
from step3vl_train.train.metrics import METRICS, read_jsonl

# The seed of every evaluation's rollouts (the hf engine; vLLM takes none): the same noise each time, so
# that two evaluations differ by the policy, and apart from the training rollouts' seeds (never negative).
EVAL_SEED = -1
PASS = 1.0  # a response with at least this reward solved its prompt


class Validation:
    def __init__(self, cfg: RLConfig, processor: Step3VLProcessor):
        self.cfg = cfg
        self.processor = processor
        rollout = cfg.rollout
        self.sampling: SamplingParams = chat_sampling(
            processor,
            rollout.eval.n,
            rollout.eval.temperature,
            rollout.eval.max_new_tokens or rollout.max_new_tokens,
            rollout.eval.top_p,
            rollout.eval.top_k,
        )
        self.loaders()  # a missing eval source fails the run's start, not its first evaluation

    def due(self, step: int) -> bool:
        """Whether an evaluation follows `step` (step 0: before the first iteration)."""
        trainer = self.cfg.trainer
        if not self.cfg.prompts.eval:
            return False
        if step == 0:
            return trainer.eval_before_train
        return trainer.eval_every > 0 and (step % trainer.eval_every == 0 or step == trainer.max_steps)

    def prompts(self) -> list[Prompt]:
        """The first `prompts.eval_max_prompts` prompts of each eval source (all of it: null), in the
        sources' order; unusable ones are skipped as in training."""
        size, loaders = self.cfg.prompts.eval_max_prompts or sys.maxsize, self.loaders()
        prompts = [prompt for loader in loaders for prompt in loader.next_batch(size)]
        if not prompts:
            skips = sum((loader.skips for loader in loaders), Counter())
            raise ValueError(f"prompts.eval holds no usable prompt (skipped, by reason: {dict(skips)})")
        return prompts

    def loaders(self) -> list[PromptLoader]:
        """A reader of each eval source from its start, each read once. PaCoRe's messages are drawn as for
        step 0 every time, so they too are the same every evaluation."""
        prompts, cfg = self.cfg.prompts, self.cfg
        pacore = cfg.pacore if cfg.stage == "pacore" else None
        return [
            PromptLoader(
                PromptsConfig(
                    sources=[source], root=prompts.root, max_prompt_tokens=prompts.max_prompt_tokens, seed=prompts.seed
                ),
                self.processor,
                cfg.reward.fn,
                max_epochs=1,
                pacore=pacore,
            )
            for source in prompts.eval
        ]


def validation_metrics(responses: list[Response]) -> dict:
    """`eval/reward`: the mean reward of the valid responses; `eval/pass@1`: the mean over prompts of the share
    of each one's valid responses that solved it (reward >= PASS), so a prompt counts once however many of
    its responses the scorer failed on; both per source too (`eval/reward/<source>`). None where no response
    was valid. `responses` are one rollout's: `group` numbers their prompt."""
    row = {
        "eval/prompts": len({r.group for r in responses}),
        "eval/responses": len(responses),
        "eval/response_len_mean": float(np.mean([r.length for r in responses])),
        "eval/truncated_fraction": float(np.mean([r.completion.finish_reason == "length" for r in responses])),
        **reward_and_pass_at_1(responses, "eval/reward", "eval/pass@1"),
    }
    by_source = defaultdict(list)
    for r in responses:
        by_source[r.prompt.task].append(r)
    for source, part in sorted(by_source.items()):
        row |= reward_and_pass_at_1(part, f"eval/reward/{source}", f"eval/pass@1/{source}")
    return row


def reward_and_pass_at_1(responses: list[Response], reward_key: str, pass_key: str) -> dict:
    valid = [r for r in responses if r.valid]
    solves = defaultdict(list)  # by prompt: whether each valid response solved it
    for r in valid:
        solves[r.group].append(r.reward >= PASS)
    return {
        reward_key: float(np.mean([r.reward for r in valid])) if valid else None,
        pass_key: float(np.mean([np.mean(prompt) for prompt in solves.values()])) if solves else None,
    }


def evaluated_before_training(run_dir: Path) -> bool:
    """Whether `metrics.jsonl` holds step 0's row. A run that restarts before its first checkpoint starts over
    from step 0, but the logs keep that row (they are cut back to the step resumed from, 0): the evaluation
    before training is done, and the restart's would repeat it on the same weights."""
    return any(row["step"] == 0 for row in read_jsonl(run_dir / METRICS))
