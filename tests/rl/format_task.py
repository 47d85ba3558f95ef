"""A verifiable task for testing that RL learns: "Say the secret digit." (always 7), and a tiny policy that
has learned the answer format (reasoning, `</think>`, `\\boxed{d}`) with d uniformly random, so that it
starts near a reward of 0.1 and only RL can raise it."""

from __future__ import annotations

import json
from pathlib import Path

import torch

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


def train_format_model(model_config, processor, out: Path, steps: int = 150, seed: int = 0) -> Path:
    """Plain supervised training on the format with random digits; saved in the released layout."""
    torch.manual_seed(seed)
    model = Step3VLForConditionalGeneration(model_config).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    conversations = [
        processor(
            [
                {"role": "user", "content": QUESTION},
                {"role": "assistant", "reasoning_content": "I pick one.", "content": f"\\boxed{{{digit}}}"},
            ]
        )
        for digit in range(10)
    ]
    for _ in range(steps):
        batch = collate(conversations, processor.tokenizer.pad_token_id)
        loss = model(**batch.model_inputs()).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.save_pretrained(out)
    (out / "format_loss.json").write_text(json.dumps({"loss": loss.item()}))
    return out
