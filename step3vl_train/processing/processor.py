"""Conversation + images -> model inputs: chat rendering, crop planning, pixels, placeholder expansion.

`Step3VLProcessor` handles one sample; `collate` pads samples into a `Batch` for the model.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
from PIL import Image
from transformers import PreTrainedTokenizerBase

from step3vl_train.processing.chat import REASONING_CHAT_TEMPLATE, render_chat
from step3vl_train.processing.config import ProcessorConfig
from step3vl_train.processing.crops import CropPlan, num_image_tokens, plan_crops
from step3vl_train.processing.documents import render_document
from step3vl_train.processing.pixels import PixelSpec, PixelViews, image_views, model_pixels
from step3vl_train.processing.placeholders import ImageTokenIds, expand_image_placeholders

IGNORE_INDEX = -100


@dataclass
class ProcessedSample:
    """One conversation ready for the model; L counts tokens after placeholder expansion."""

    input_ids: torch.Tensor  # (L,) int64
    labels: torch.Tensor  # (L,) int64: the token where the assistant writes it, IGNORE_INDEX elsewhere
    pixels: PixelViews | None  # uint8 views of the images, None without images
    num_patches: list[int]  # crops per image
    patch_newline_mask: torch.Tensor  # (N_crops,) bool: a <patch_newline> follows the crop


@dataclass
class Batch:
    """Padded samples; images in sample order (the order of the placeholders), still uint8 until
    `model_inputs` places them."""

    input_ids: torch.Tensor  # (B, L) int64
    attention_mask: torch.Tensor  # (B, L) int64, 0 on padding
    labels: torch.Tensor  # (B, L) int64, IGNORE_INDEX on padding
    pixels: PixelViews | None  # all samples' images, None without images
    num_patches: list[int]  # per image, all samples
    # (B, L) int64 for packed rows: restarting at each sample, which is what keeps packed samples apart.
    position_ids: torch.Tensor | None = None

    def model_inputs(
        self,
        with_labels: bool = True,
        device: torch.device | str | None = None,
        pixel_dtype: torch.dtype = torch.float32,
    ) -> dict[str, Any]:
        """The model's keyword arguments, every tensor on `device` (None: where the batch is): `pixel_values`
        (ΣN_images, 3, S, S) and `patch_pixel_values` (ΣN_crops, 3, s, s) or None, normalised there in
        float32 and cast to `pixel_dtype`. Copies are asynchronous from pinned memory."""
        # Packed rows pass position ids instead of the padding mask: the model keeps their samples apart
        # by them (and runs them without a KV cache, which would let the samples see each other).
        packed = self.position_ids is not None
        pixel_values, patch_pixel_values = (
            model_pixels(self.pixels, device, pixel_dtype) if self.pixels is not None else (None, None)
        )
        offset = self.pixels.view_offset if self.pixels is not None else None
        inputs = {
            "input_ids": self.input_ids.to(device, non_blocking=True),
            "attention_mask": None if packed else self.attention_mask.to(device, non_blocking=True),
            **({"position_ids": self.position_ids.to(device, non_blocking=True)} if packed else {}),
            "pixel_values": pixel_values,
            "patch_pixel_values": patch_pixel_values,
            "num_patches": self.num_patches,
            **({"view_offset": offset} if offset is not None else {}),  # some of the views only
        }
        return {**inputs, "labels": self.labels.to(device, non_blocking=True)} if with_labels else inputs

    def pin_memory(self) -> Batch:
        """A copy in page-locked memory (what `DataLoader(pin_memory=True)` calls), so that `model_inputs`
        copies it to the GPU asynchronously."""
        return replace(
            self,
            input_ids=self.input_ids.pin_memory(),
            attention_mask=self.attention_mask.pin_memory(),
            labels=self.labels.pin_memory(),
            pixels=self.pixels.pin_memory() if self.pixels is not None else None,
            position_ids=self.position_ids.pin_memory() if self.position_ids is not None else None,
        )

    def view_sides(self) -> list[int]:
        """The side in pixels of each of the rows' ViT inputs: the global views, then the crops (all of them,
        where `pixels` holds only a sequence-parallel rank's share)."""
        if self.pixels is None:
            return []
        spec = self.pixels.spec
        return [spec.image_size] * len(self.num_patches) + [spec.crop_size] * sum(self.num_patches)


@dataclass
class TokenLayout:
    """A sample's tokens before any pixel is computed: what packing needs to know about it."""

    input_ids: list[int]  # after placeholder expansion
    loss_mask: list[int]  # 1 where the sample is learned
    plans: list[CropPlan]  # one per image, in placeholder order
    image_spans: list[tuple[int, int]]  # [start, end) of each image's tokens in input_ids

    def __len__(self) -> int:
        return len(self.input_ids)

    def truncated(self, max_len: int) -> TokenLayout:
        """The first `max_len` tokens, cut before any image that would not fit whole."""
        cut = max_len
        for start, end in self.image_spans:
            if start < cut < end:
                cut = start
        kept = sum(end <= cut for _, end in self.image_spans)
        return TokenLayout(self.input_ids[:cut], self.loss_mask[:cut], self.plans[:kept], self.image_spans[:kept])

    @property
    def num_views(self) -> int:
        """ViT inputs: every image's global view and crops."""
        return sum(1 + plan.num_crops for plan in self.plans)


class Step3VLProcessor:
    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        config: ProcessorConfig | None = None,
        chat_template: str = REASONING_CHAT_TEMPLATE,
    ):
        self.tokenizer = tokenizer
        self.config = config or ProcessorConfig()
        self.chat_template = chat_template
        self.image_token_ids = ImageTokenIds.from_tokenizer(tokenizer)

    def __call__(
        self,
        messages: list[dict[str, Any]],
        images: Sequence[Image.Image] = (),
        add_generation_prompt: bool = False,
        sample: str = "<sample>",
    ) -> ProcessedSample:
        """`messages` in OpenAI-style content parts, one `{"type": "image"}` per entry of `images`, in order.
        `sample` names the sample in errors."""
        layout = self.layout(messages, [image.size for image in images], add_generation_prompt, sample=sample)
        return self.render(layout, images)

    def layout(
        self,
        messages: list[dict[str, Any]] | None,
        image_sizes: Sequence[tuple[int, int]],
        add_generation_prompt: bool = False,
        document: str | list[dict[str, Any]] | None = None,
        sample: str = "<sample>",
    ) -> TokenLayout:
        """Tokens of a conversation (`messages`, loss on what the assistant writes) or of a pre-training
        `document` (loss on all its text), with each image's placeholder expanded for its (width, height)."""
        if (messages is None) == (document is None):
            raise ValueError(f"{sample}: give exactly one of messages and document")
        if document is not None:
            ids, mask = render_document(self.tokenizer, document, self.image_token_ids.im_patch)
        else:
            ids, mask = render_chat(self.tokenizer, messages, add_generation_prompt, self.chat_template)
        plans = [plan_crops(width, height, self.config) for width, height in image_sizes]
        placeholders = [i for i, token in enumerate(ids) if token == self.image_token_ids.im_patch]
        expanded, mask = expand_image_placeholders(ids, mask, plans, self.config, self.image_token_ids, sample)
        lengths = [num_image_tokens(plan, self.config) for plan in plans]
        starts = [at + sum(length - 1 for length in lengths[:k]) for k, at in enumerate(placeholders)]
        spans = [(start, start + length) for start, length in zip(starts, lengths, strict=True)]
        return TokenLayout(expanded, mask, plans, spans)

    def render(self, layout: TokenLayout, images: Sequence[Image.Image]) -> ProcessedSample:
        """Tensors of a laid-out sample; `images` are the ones its layout was planned for."""
        views = [image_views(image, self.config) for image in images]
        if [view.plan for view in views] != layout.plans:
            raise ValueError("images differ from the ones the layout was planned for")
        input_ids = torch.tensor(layout.input_ids, dtype=torch.long)
        return ProcessedSample(
            input_ids=input_ids,
            labels=torch.where(torch.tensor(layout.loss_mask, dtype=torch.bool), input_ids, IGNORE_INDEX),
            pixels=PixelViews.from_images(views, PixelSpec.from_config(self.config)) if views else None,
            num_patches=[view.plan.num_crops for view in views],
            patch_newline_mask=torch.tensor([m for view in views for m in view.plan.newline_mask], dtype=torch.bool),
        )


def collate(samples: Sequence[ProcessedSample], pad_token_id: int, padding_side: str = "right") -> Batch:
    """Pads to the longest sample, masked out of attention and loss. Training pads on the right; batched
    generation pads prompts on the left (`generate` derives position ids from the attention mask)."""
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', not {padding_side!r}")
    length = max(len(s.input_ids) for s in samples)
    input_ids = torch.full((len(samples), length), pad_token_id, dtype=torch.long)
    labels = torch.full((len(samples), length), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(samples), length), dtype=torch.long)
    for row, s in enumerate(samples):
        n = len(s.input_ids)
        span = slice(length - n, length) if padding_side == "left" else slice(0, n)
        input_ids[row, span], labels[row, span], attention_mask[row, span] = s.input_ids, s.labels, 1
    pixels = [s.pixels for s in samples if s.pixels is not None]
    return Batch(
        input_ids=input_ids,
        attention_mask=attention_mask,
        labels=labels,
        pixels=PixelViews.cat(pixels) if pixels else None,
        num_patches=[n for s in samples for n in s.num_patches],
    )


def load_processor(tokenizer: str = "tiny", config: str | dict | None = None) -> Step3VLProcessor:
    """`tokenizer`: "tiny" or a tokenizer directory; `config`: a processor YAML path, a mapping, or None
    for the released processor's settings."""
    from omegaconf import OmegaConf

    from step3vl_train.processing.tokenizer import load_tokenizer

    if isinstance(config, str):
        config = OmegaConf.to_container(OmegaConf.load(config), resolve=True)
    return Step3VLProcessor(load_tokenizer(tokenizer), ProcessorConfig.from_dict(config) if config else None)
