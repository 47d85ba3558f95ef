"""Greedy answers of the model being trained to fixed prompts, for watching a run learn.

Every rank generates (ZeRO-3 gathers are collectives, so all ranks take part, with `synced_gpus`), on the
same prompts so that all of them call the same modules; rank 0 records the answers.
"""

from __future__ import annotations

from pathlib import Path

import torch

from step3vl_train.processing.images import load_image
from step3vl_train.processing.processor import Step3VLProcessor, collate


def answer_prompts(
    model, processor: Step3VLProcessor, prompts: list[dict], max_new_tokens: int, device: torch.device
) -> list[dict]:
    """[{"image", "text", "prediction"}] for `prompts` of {"image": path or None, "text": question}, the
    model's inputs placed on `device` (the engine's)."""
    rows = []
    was_training = model.training
    model.eval()
    for prompt in prompts:
        images = [load_image(prompt["image"])] if prompt.get("image") else []
        content = [{"type": "image"} for _ in images] + [{"type": "text", "text": prompt["text"]}]
        sample = processor([{"role": "user", "content": content}], images, add_generation_prompt=True)
        batch = collate([sample], processor.tokenizer.pad_token_id or 0)
        inputs = batch.model_inputs(with_labels=False, device=device, pixel_dtype=model.dtype)
        with torch.no_grad():
            output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, synced_gpus=True)
        new_tokens = output[0, inputs["input_ids"].shape[1] :].cpu()
        rows.append({**prompt, "prediction": processor.tokenizer.decode(new_tokens, skip_special_tokens=False)})
    model.train(was_training)
    return rows


def resolve_prompt_paths(prompts: list[dict], root: Path) -> list[dict]:
    """Relative image paths are read from the repository root, as the default prompts are."""
    return [
        {
            **p,
            "image": str(root / p["image"])
            if p.get("image") and not Path(p["image"]).is_absolute()
            else p.get("image"),
        }
        for p in prompts
    ]
