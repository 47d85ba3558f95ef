"""A verifiable task for testing that RL learns: "Say the secret digit." (always 7), and a tiny policy that
has learned the answer format (reasoning, `</think>`, `\\boxed{d}`) with d uniformly random, so that it
starts near a reward of 0.1 and only RL can raise it.

Its PaCoRe form: each prompt's secret is its own random digit, which only its message pool tells (most of
the pool's conclusions box it), and a policy that has learned the format under the synthesis template
only, reading its references half the time (sampled, it answers the secret about a quarter of the
time): RL on synthesis rounds makes it a better reader; given no messages it cannot know the secret."""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch

from rl.pacore.template import render
from step3vl_train.data.shards import ShardSetWriter
from step3vl_train.model import Step3VLForConditionalGeneration
from step3vl_train.processing.processor import collate

QUESTION = "Say the secret digit."
SECRET = "7"


def write_prompts(out: Path, num: int) -> Path:
    writer = ShardSetWriter(str(out), max_samples=max(1, num // 2))
    for index in range(num):
        record = {"messages": [{"role": "user", "content": QUESTION}], "answer": SECRET, "reward": "math"}
        writer.write(f"secret-{index:06d}", record, [], [])
    writer.close()
    return out


def pool_entry(digit: int, secret: int) -> dict:
    return {"text": f"\\boxed{{{digit}}}", "finished": True, "reward": float(digit == secret), "status": "ok",
            "model": "format_model"}  # fmt: skip


def write_pooled_prompts(out: Path, num: int, pool_size: int = 8, right: int = 6, seed: int = 0) -> Path:
    """PaCoRe prompts: a random secret digit each, and a pool whose `right` of `pool_size` messages box it."""
    rng = random.Random(seed)
    writer = ShardSetWriter(str(out), max_samples=max(1, num // 2))
    for index in range(num):
        secret = rng.randrange(10)
        wrong = [rng.choice([d for d in range(10) if d != secret]) for _ in range(pool_size - right)]
        pool = [pool_entry(d, secret) for d in [secret] * right + wrong]
        rng.shuffle(pool)
        record = {"messages": [{"role": "user", "content": QUESTION}], "answer": str(secret), "reward": "math",
                  "pool": pool}  # fmt: skip
        writer.write(f"pooled-{index:06d}", record, [], [])
    writer.close()
    return out


def synthesis_example(rng: random.Random, reads: float) -> tuple[str, int]:
    """A synthesis prompt with 4-8 boxed digits as references, most of them one secret digit, and the digit
    answered: the secret with probability `reads`, else a random one."""
    secret = rng.randrange(10)
    references = [secret] * rng.randint(3, 6) + [rng.randrange(10) for _ in range(2)]
    rng.shuffle(references)
    digit = secret if rng.random() < reads else rng.randrange(10)
    return render(QUESTION, [f"\\boxed{{{d}}}" for d in references]), digit


def train_format_model(
    model_config, processor, out: Path, steps: int = 150, seed: int = 0, reads: float | None = None
) -> Path:
    """Plain supervised training on the format with random digits; saved in the released layout.
    `reads`: under the synthesis template instead (16 fresh prompts a step), answering the references'
    majority digit with this probability: a weak reader of references that RL on synthesis rounds can
    make a better one."""
    torch.manual_seed(seed)
    rng = random.Random(seed)
    model = Step3VLForConditionalGeneration(model_config).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)

    def conversation(question: str, digit: int):
        return processor(
            [
                {"role": "user", "content": question},
                {"role": "assistant", "reasoning_content": "I pick one.", "content": f"\\boxed{{{digit}}}"},
            ]
        )

    plain = [conversation(QUESTION, digit) for digit in range(10)]
    for _ in range(steps):
        examples = plain if reads is None else [conversation(*synthesis_example(rng, reads)) for _ in range(16)]
        batch = collate(examples, processor.tokenizer.pad_token_id)
        loss = model(**batch.model_inputs()).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.save_pretrained(out)
    (out / "format_loss.json").write_text(json.dumps({"loss": loss.item()}))
    return out
