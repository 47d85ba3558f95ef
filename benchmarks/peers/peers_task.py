"""The RL task of `benchmarks/peers_cpu.py`, the same on both sides: standard library only, so that our
reward pool (`reward` below, by import path) and TRL's reward function (`trl_reward`) run this one file.

A prompt asks for lowercase letters or for digits; the reward is the share of the response's visible
characters that are of the kind asked. Why this task: our tiny tokenizer (859 byte-level BPE tokens in a
1,024-row head) has the ten digits and about 500 lowercase word pieces as tokens of their own, so each of
the 4 new tokens can meet the request by itself, and the reward is graded, not all or nothing. A uniform
draw of 4 tokens scores 0.77 on "lowercase" prompts and 0.04 on "digits" prompts: a group of 8 responses
has reward variance from the first iteration, and the policy must read the prompt to do well on both
(the mean passes 0.5 only then). From random weights, a 2-layer x 64 decoder at a learning rate of 1e-2
rises within about 60 iterations of 4 prompts x 8 responses (TRL, 2026-11-28: 0.44 to 0.9); at 1e-3 it
does not move in 100, at 3e-2 it settles at 0.5 (lowercase whatever the prompt).
"""

from __future__ import annotations

import random
import re

KINDS = {"lowercase": "lowercase letters", "digits": "digits"}
WORDS = (
    "the cat sat on a mat near red box with two blue balls and one green cone under bright sky while small "
    "dog ran past old tree by river"
).split()
# Special tokens (ours are <|...|> and <im_...>-style): their text is not the model's answer.
SPECIAL = re.compile(r"<\|[^|>]*\|>|</?(?:think|im_patch|im_start|im_end|patch_start|patch_end|patch_newline)>")


def prompts(count: int, seed: int = 0) -> list[tuple[str, str]]:
    """(user message, kind): a filler sentence of 3-7 words, then the request; kinds alternate."""
    rng = random.Random(seed)
    out = []
    for index in range(count):
        kind = list(KINDS)[index % len(KINDS)]
        filler = " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 7))).capitalize()
        out.append((f"{filler}. Reply in {KINDS[kind]}.", kind))
    return out


def score(text: str, kind: str) -> float:
    """Share of the visible characters (specials and whitespace left out) that are of `kind`; 0 if none."""
    visible = [c for c in SPECIAL.sub("", text) if not c.isspace()]
    if not visible:
        return 0.0
    wanted = str.isdigit if kind == "digits" else (lambda c: "a" <= c <= "z")
    return sum(1 for c in visible if wanted(c)) / len(visible)


def reward(request, **options) -> float:
    """Our side: `reward` field `peers_task:reward` (rl/rewards/registry.py); the kind is the answer."""
    return score(request.response, request.answer)


def trl_reward(completions, answer, **kwargs) -> list[float]:
    """TRL's side: its dataset's `answer` column holds the kind."""
    return [score(text, kind) for text, kind in zip(completions, answer, strict=True)]
