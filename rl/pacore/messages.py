"""Compaction (spec 6.1-6.2): from a round's rollouts to the messages the next round reads; the order of
the references; and a training episode's messages drawn from a prompt's pool (spec 5.7).

A message is a conclusion, capped at `pacore.max_message_tokens`. Failed or empty rollouts are dropped,
and unfinished ones (cut at the length limit, or with no `</think>`) unless `pacore.keep_unfinished`;
every drop is counted by reason, never rendered as an empty reference.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from rl.pacore.config import PaCoReConfig
from rl.pacore.template import conclusion, render
from step3vl_train.processing.chat import THINK_END

ELISION = " [...] "
# Why a rollout or pool entry gives no message.
DROPS = ("failed", "empty", "unfinished")


@dataclass
class Rollout:
    """One rollout of a round, as compaction sees it."""

    text: str | None  # the response: reasoning, `</think>`, conclusion; None when the call failed
    finish_reason: str = "stop"  # "length" when cut at the limit

    @property
    def finished(self) -> bool:
        return self.text is not None and self.finish_reason != "length" and THINK_END in self.text


@dataclass
class References:
    """The references of a synthesis round, and what compaction left out."""

    texts: list[str] = field(default_factory=list)
    kept: list[int] = field(default_factory=list)  # each text's position among the candidates
    dropped: Counter[str] = field(default_factory=Counter)  # by reason: DROPS, and "over_budget"
    capped: int = 0  # messages cut to pacore.max_message_tokens
    skipped: bool = False  # over budget under `over_budget: skip`: the problem gets no synthesis


def seeded_order(count: int, *key: Any) -> list[int]:
    """A permutation of range(count), the same for the same key (str seeds hash stably across processes)."""
    order = list(range(count))
    random.Random(":".join(map(str, key))).shuffle(order)
    return order


def official_order(contents: list[str]) -> list[int]:
    """The official code's order of a round's responses (failed ones included, as empty strings): sorted by
    the length of their content, then `random.Random(42).shuffle`."""
    order = sorted(range(len(contents)), key=lambda i: len(contents[i]))
    random.Random(42).shuffle(order)
    return order


def cap(text: str, max_tokens: int, tokenize: Callable[[str], list[int]], detokenize) -> tuple[str, bool]:
    """`text`, or its head and tail around ELISION when it holds more than `max_tokens` tokens."""
    ids = tokenize(text)
    if len(ids) <= max_tokens:
        return text, False
    head = max_tokens // 2
    return detokenize(ids[:head]) + ELISION + detokenize(ids[len(ids) - (max_tokens - head) :]), True


class Compactor:
    """Rollouts to messages under `pacore.*`, counting tokens with the policy's tokenizer."""

    def __init__(self, config: PaCoReConfig, tokenizer):
        self.config = config
        self.tokenizer = tokenizer

    def tokenize(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False)

    def detokenize(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids)

    def compact(self, problem: str, candidates: list[tuple[str | None, bool]]) -> References:
        """`candidates`: (conclusion or None when the rollout failed, finished) in reference order."""
        out = References()
        for position, (text, finished) in enumerate(candidates):
            if text is None:
                out.dropped["failed"] += 1
            elif not text.strip():
                out.dropped["empty"] += 1
            elif not finished and not self.config.keep_unfinished:
                out.dropped["unfinished"] += 1
            else:
                capped, was_capped = cap(text, self.config.max_message_tokens, self.tokenize, self.detokenize)
                out.texts.append(capped)
                out.kept.append(position)
                out.capped += was_capped
        self.fit(problem, out)
        return out

    def from_rollouts(self, problem: str, rollouts: list[Rollout], order: list[int]) -> References:
        """A round's rollouts, taken in `order`, as messages (`kept`: positions in `order`)."""
        picked = [rollouts[i] for i in order]
        return self.compact(problem, [(None if r.text is None else conclusion(r.text), r.finished) for r in picked])

    def fit(self, problem: str, references: References) -> None:
        """Within `pacore.max_synthesis_tokens`: drop messages from the end, or skip the problem."""
        budget = self.config.max_synthesis_tokens
        while references.texts and len(self.tokenize(render(problem, references.texts))) > budget:
            if self.config.over_budget == "skip":
                references.dropped["over_budget"] += len(references.texts)
                references.texts, references.kept, references.skipped = [], [], True
                return
            references.texts.pop()
            references.kept.pop()
            references.dropped["over_budget"] += 1


# ---- message pools -------------------------------------------------------------------------------------


def pool_entry(
    response: str, model: str, finish_reason: str = "stop", reward: float | None = None, status: str = "unscored"
) -> dict[str, Any]:
    """A response as an entry of a sample's `pool` (step3vl_train/data/schema.py): its conclusion, whether it
    finished, its reward (None where none was computed) and status, and the checkpoint that wrote it."""
    return {
        "text": conclusion(response),
        "finished": Rollout(response, finish_reason).finished,
        "reward": reward,
        "status": status,
        "model": model,
    }


@dataclass
class PoolDraw:
    """A training episode's messages: which pool entries, in the order given, and their mean reward."""

    indices: list[int]  # into the prompt's pool
    references: References
    message_reward: float | None  # mean reward of the entries given that carry one
    usable: int  # the pool's entries a draw may take (finished, or any under keep_unfinished; not empty)


def draw_messages(
    compactor: Compactor, problem: str, pool: list[dict[str, Any]], seed: int, step: int, key: str
) -> PoolDraw:
    """|M| ~ U(low, high) entries of `pool`, seeded by (seed, step, key): a resumed run draws the same M.
    `key`: the sample's own (`record_key`), so the draw does not depend on where its shard is read from.
    Entries that would be dropped anyway (unfinished, empty) are not drawn."""
    keep_unfinished = compactor.config.keep_unfinished
    usable = [i for i, entry in enumerate(pool) if entry["text"].strip() and (keep_unfinished or entry["finished"])]
    rng = random.Random(f"{seed}:{step}:{key}")
    low, high = compactor.config.messages
    size = min(rng.randint(low, high), len(usable))
    indices = rng.sample(usable, size)
    references = compactor.compact(problem, [(pool[i]["text"], pool[i]["finished"]) for i in indices])
    given = [indices[position] for position in references.kept]
    rewards = [pool[i]["reward"] for i in given if pool[i].get("reward") is not None]
    return PoolDraw(given, references, sum(rewards) / len(rewards) if rewards else None, len(usable))
