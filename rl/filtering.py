"""Filtration by rollouts (spec 5.5, 5.7): each prompt rolled out k times with the policy, the responses
scored with the RL stage's rewards, the prompts solved sometimes but not always (0 < correct < scored)
kept as shards. `data/filter_difficulty.py` runs it on the problems, `data/filter_synthesis.py` on their
PaCoRe synthesis rounds (the loader under `stage=pacore` draws each prompt's messages from its pool).

A response whose reward could not be computed (timeout, error) counts for neither side.
"""

from __future__ import annotations

import argparse
import itertools
import sys
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from tqdm import tqdm

from rl.config import RLConfig
from rl.engines import build_rollout_engine, engine_options
from rl.experience import Prompt, Response
from rl.iteration import group_responses, sampling_params, score_rewards
from rl.pacore.messages import pool_entry
from rl.preflight import check_weights
from rl.prompts import PromptLoader
from rl.rewards import RewardScorer
from step3vl_train.data.encoding import image_suffix
from step3vl_train.data.shards import ShardSetWriter
from step3vl_train.data.sources import record_key
from step3vl_train.processing.processor import load_processor
from step3vl_train.train.recipes import register_recipes
from step3vl_train.usage import UsageError

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def filter_parser(description: str, k: int, k_help: str) -> argparse.ArgumentParser:
    """The options every filter takes: its k rollouts a prompt, where it writes, the prompts a generate call
    and what counts as correct; then the Hydra overrides, after `--`."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--k", type=int, default=k, help=k_help)
    parser.add_argument("--out", required=True)
    parser.add_argument("--batch-prompts", type=int, default=32, help="prompts per generate call")
    parser.add_argument("--solved-at", type=float, default=1.0, help="a reward at least this counts as correct")
    return parser


def load_config(tool: str, overrides: list[str]) -> RLConfig:
    """The RL config (configs/rl.yaml with Hydra `overrides`), its weights checked; a mistake exits naming
    `tool`."""
    register_recipes()
    with initialize_config_dir(str(CONFIGS), version_base="1.3"):
        raw = OmegaConf.to_container(compose("rl", overrides), resolve=True)
    try:
        cfg = RLConfig.from_dict(raw)
        check_weights(cfg)
    except UsageError as error:
        sys.exit(f"{tool}: {error}")
    return cfg


def policy_name(cfg: RLConfig) -> str:
    """The checkpoint that writes the rollouts: vLLM's `rollout.model` (default `policy.init_from`), the
    transformers engine's `policy.init_from`, as an absolute path."""
    path = (cfg.rollout.model if cfg.rollout.engine == "vllm" else None) or cfg.policy.init_from
    return str(Path(path).resolve()) if path else "from_scratch"


@dataclass
class Group:
    """One prompt's k responses, scored."""

    prompt: Prompt
    responses: list[Response]
    texts: list[str]  # each response decoded, its stop token left out (what the rewards read)
    solved_at: float

    @property
    def scored(self) -> int:
        """Responses whose reward was computed."""
        return sum(r.valid for r in self.responses)

    @property
    def correct(self) -> int:
        return sum(r.valid and r.reward >= self.solved_at for r in self.responses)

    @property
    def kept(self) -> bool:
        return 0 < self.correct < self.scored

    @property
    def outcome(self) -> str:
        """kept, all (every scored response correct) or none (no response correct, or none scored)."""
        if self.kept:
            return "kept"
        return "all" if self.scored and self.correct == self.scored else "none"

    def pool(self, model: str) -> list[dict[str, Any]]:
        """The responses as pool entries (the schema's `pool`): conclusion, finished, reward (null where it
        could not be computed), status and the checkpoint that wrote them."""
        return [
            pool_entry(text, model, r.completion.finish_reason, float(r.reward) if r.valid else None, r.status)
            for r, text in zip(self.responses, self.texts, strict=True)
        ]


class RolloutFilter:
    """The policy, its engine and the stage's rewards, over the prompts of `loader`."""

    def __init__(self, cfg: RLConfig, k: int, batch_prompts: int, solved_at: float, pacore: bool = False):
        """`pacore`: the prompts are synthesis rounds drawn from the samples' pools (`cfg.pacore`)."""
        self.k, self.batch_prompts, self.solved_at = k, batch_prompts, solved_at
        self.model = policy_name(cfg)
        processor = load_processor(cfg.tokenizer, cfg.processor or None)
        self.tokenizer = processor.tokenizer
        self.loader = PromptLoader(cfg.prompts, processor, cfg.reward.fn, 1, cfg.pacore if pacore else None, True)
        options = engine_options(cfg, self.tokenizer.pad_token_id or 0, True)
        self.engine = build_rollout_engine(cfg.rollout.engine, **options)
        self.sampling = replace(sampling_params(cfg, processor), n=k)
        self.scorer = RewardScorer(cfg.reward)
        self.tasks: defaultdict[str, Counter[str]] = defaultdict(Counter)
        self.seen = self.kept = 0

    def groups(self) -> Iterator[Group]:
        """Every prompt once, in the loader's order, with its k scored responses. All k responses to a
        prompt share its messages: the loader draws them once a prompt (step 0)."""
        stop = set(self.sampling.stop_token_ids)
        with tqdm(desc="prompts", unit="prompt") as progress:
            for batch_index in itertools.count():
                prompts = self.loader.next_batch(self.batch_prompts, step=0)
                if not prompts:
                    return
                responses = group_responses(prompts, self.engine.generate(prompts, self.sampling, seed=batch_index))
                score_rewards(self.scorer, responses, self.tokenizer.decode, self.sampling.stop_token_ids)
                for index, prompt in enumerate(prompts):
                    own = responses[index * self.k : (index + 1) * self.k]
                    texts = [self.tokenizer.decode([t for t in r.completion.token_ids if t not in stop]) for r in own]
                    group = Group(prompt, own, texts, self.solved_at)
                    self.tasks[prompt.task][group.outcome] += 1
                    self.seen += 1
                    self.kept += group.kept
                    yield group
                progress.update(len(prompts))

    def summary(self) -> dict[str, Any]:
        """Prompts read, kept, skipped by the loader (by reason), and each task's kept / all / none."""
        tasks = {task: dict(counts) for task, counts in self.tasks.items()}
        return {"prompts": self.seen, "kept": self.kept, "skipped": dict(self.loader.skips), "by_task": tasks}

    def close(self) -> None:
        self.scorer.close()


def write_prompt(writer: ShardSetWriter, prompt: Prompt, pool: list[dict[str, Any]] | None) -> None:
    """A kept prompt as a sample: the problem as stored (not a synthesis round), its answer, reward, boxes
    and points, its images, and `pool` when given."""
    messages = prompt.original_messages if prompt.original_messages is not None else prompt.messages
    record: dict[str, Any] = {"messages": messages, "answer": prompt.answer, "reward": prompt.reward}
    record |= {k: v for k, v in (("boxes", prompt.boxes), ("points", prompt.points)) if v}
    if pool is not None:
        record["pool"] = pool
    suffixes = [image_suffix(prompt.key, data) for data in prompt.images]
    writer.write(record_key(prompt.key), record, prompt.images, suffixes)
