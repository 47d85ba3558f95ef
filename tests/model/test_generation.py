"""Batched generation through the processor: left-padded prompts decode as each prompt does alone."""

import math

import torch
from PIL import Image

from step3vl_train.processing.config import ProcessorConfig
from step3vl_train.processing.processor import Step3VLProcessor, collate
from step3vl_train.processing.tokenizer import load_tokenizer


def test_left_padded_batch_generates_as_each_prompt_alone(tiny_model):
    with torch.no_grad():  # random weights large enough that the argmax depends on the context
        for param in tiny_model.parameters():
            param.normal_(0, 0.3)
    processor = Step3VLProcessor(
        load_tokenizer("tiny"), ProcessorConfig(image_size=224, crop_size=168, max_image_size=672)
    )
    image_prompt = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]}]
    prompts = [
        processor(image_prompt, [Image.new("RGB", (400, 300), "blue")], add_generation_prompt=True),
        processor([{"role": "user", "content": "Hi there, how are you?"}], add_generation_prompt=True),
        processor(image_prompt, [Image.new("RGB", (90, 120), "red")], add_generation_prompt=True),
    ]
    pad = processor.tokenizer.pad_token_id
    options = {"max_new_tokens": 6, "do_sample": False, "eos_token_id": None}

    batch = collate(prompts, pad, padding_side="left").model_inputs(with_labels=False)
    together = tiny_model.generate(**batch, **options)[:, batch["input_ids"].shape[1] :]
    for row, prompt in enumerate(prompts):
        alone = collate([prompt], pad).model_inputs(with_labels=False)
        expected = tiny_model.generate(**alone, **options)[0, len(prompt.input_ids) :]
        assert together[row].tolist() == expected.tolist(), row


def test_the_vision_tower_runs_at_prefill_only(tiny_model, tiny_processor):
    """generate passes some image inputs again at every decode step; they are in the KV cache already."""
    prompt = tiny_processor(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]}],
        [Image.new("RGB", (800, 600), "blue")],
        add_generation_prompt=True,
    )
    crops = prompt.num_patches[0]
    assert crops > 0  # the global view, then the crops in chunks of compute.vision_chunk
    prefill_calls = 1 + math.ceil(crops / tiny_model.runtime.compute.vision_chunk)
    calls = []
    tiny_model.vision_model.register_forward_hook(lambda *_: calls.append(1))
    inputs = collate([prompt], tiny_processor.tokenizer.pad_token_id).model_inputs(with_labels=False)
    tiny_model.generate(**inputs, max_new_tokens=8, min_new_tokens=8, do_sample=False)
    assert len(calls) == prefill_calls
