"""`launch/evaluate.py`'s settings (configs/evaluate.yaml): the benchmark (configs/bench/NAME.yaml), the
chat model, and the modes it is scored in."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from omegaconf import MISSING

from rl.chat_models import ChatModelConfig
from rl.pacore.config import PaCoReConfig
from rl.pacore.inference import ProblemsConfig
from rl.rewards import RewardConfig

MODES = ("sere", "pacore")


@dataclass
class ReplyLengths:
    """max_new_tokens of a reply, by mode (spec 5.8): SeRe's 64K; PaCoRe's 128K for every round, as the
    official code's max_tokens."""

    sere: int = 65536
    pacore: int = 131072


@dataclass
class BenchmarkConfig:
    name: str = MISSING  # the results' folder, OUT/NAME
    data: ProblemsConfig = field(default_factory=ProblemsConfig)  # data=PATHS sets data.paths
    # None: each sample's messages as stored. Else the last user turn becomes this text, `{question}` being
    # that turn's text and `<image>` where its images go (the report's Appendix C prompts).
    template: str | None = None
    reward: str | None = None  # every problem's reward (rl/rewards); None: each sample's own `reward`
    samples: int = 1  # responses a problem in each mode (in pacore, whole PaCoRe runs)
    max_new_tokens: ReplyLengths = field(default_factory=ReplyLengths)


def chat_defaults() -> ChatModelConfig:
    """Spec 5.8's sampling. max_new_tokens caps every mode's length (the benchmark's), here by the longest."""
    return ChatModelConfig(backend="hf", max_new_tokens=ReplyLengths().pacore, temperature=1.0, top_p=1.0)


@dataclass
class EvaluateConfig:
    chat: ChatModelConfig = field(default_factory=chat_defaults)
    bench: BenchmarkConfig = field(default_factory=BenchmarkConfig)
    modes: list[str] = field(default_factory=lambda: list(MODES))
    out: str = "outputs/evaluation"  # OUT/<bench.name>/: results.jsonl, summary.json, settings.json
    max_problems: int | None = None  # None: every problem, each read once
    batch_problems: int = 16  # problems whose requests go to the chat model together
    seed: int = 0  # the reading order of shards, and SeRe's sampling on the hf engine
    pacore: PaCoReConfig = field(default_factory=PaCoReConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)

    def __post_init__(self) -> None:
        self.bench.data.check()
        if not re.fullmatch(r"[A-Za-z0-9][\w.-]*", self.bench.name):
            raise ValueError(f"bench.name names a folder: letters, digits, '.', '_' and '-', not {self.bench.name!r}")
        if self.bench.samples < 1:
            raise ValueError(f"bench.samples must be positive, not {self.bench.samples}")
        if not self.modes or len(set(self.modes)) != len(self.modes) or not set(self.modes) <= set(MODES):
            raise ValueError(f"modes must be a list of distinct modes out of {list(MODES)}, not {self.modes}")
        if self.batch_problems < 1:
            raise ValueError(f"batch_problems must be positive, not {self.batch_problems}")
        if self.max_problems is not None and self.max_problems < 1:
            raise ValueError(f"max_problems must be positive or null, not {self.max_problems}")

    def reply_length(self, mode: str) -> int:
        """The benchmark's length for `mode`, capped by chat.max_new_tokens."""
        return min(getattr(self.bench.max_new_tokens, mode), self.chat.max_new_tokens)
