"""Expanding each image's single `<im_patch>` placeholder into its token layout (spec section 3):
per crop `<patch_start>` + crop tokens + `<patch_end>` (+ `<patch_newline>` at a row end), then
`<im_start>` + global-view tokens + `<im_end>`."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase

from step3vl_train.processing.config import ProcessorConfig
from step3vl_train.processing.crops import CropPlan


class PlaceholderMismatchError(ValueError):
    """A sample whose `<im_patch>` placeholders and images differ in number."""


@dataclass(frozen=True)
class ImageTokenIds:
    im_patch: int
    im_start: int
    im_end: int
    patch_start: int
    patch_end: int
    patch_newline: int

    @classmethod
    def from_tokenizer(cls, tokenizer: PreTrainedTokenizerBase) -> ImageTokenIds:
        vocab = tokenizer.get_vocab()
        tokens = {name: f"<{name}>" for name in cls.__dataclass_fields__}
        missing = [token for token in tokens.values() if token not in vocab]
        if missing:
            raise ValueError(f"tokenizer lacks image tokens: {', '.join(missing)}")
        return cls(**{name: vocab[token] for name, token in tokens.items()})


def image_token_ids(plan: CropPlan, cfg: ProcessorConfig, ids: ImageTokenIds) -> list[int]:
    """The token ids one image expands to; `num_image_tokens(plan, cfg)` long."""
    tokens: list[int] = []
    for newline in plan.newline_mask:
        tokens += [ids.patch_start] + [ids.im_patch] * cfg.crop_tokens + [ids.patch_end]
        tokens += [ids.patch_newline] if newline else []
    return tokens + [ids.im_start] + [ids.im_patch] * cfg.global_tokens + [ids.im_end]


def expand_image_placeholders(
    input_ids: list[int],
    loss_mask: list[int],
    plans: Sequence[CropPlan],
    cfg: ProcessorConfig,
    ids: ImageTokenIds,
    sample: str,
) -> tuple[list[int], list[int]]:
    """Replaces the k-th `<im_patch>` with the k-th image's tokens (loss mask 0 over them)."""
    placeholders = input_ids.count(ids.im_patch)
    if placeholders != len(plans):
        raise PlaceholderMismatchError(f"{sample}: {placeholders} image placeholder(s) but {len(plans)} image(s)")
    expanded_ids: list[int] = []
    expanded_mask: list[int] = []
    images = iter(plans)
    for token, mask in zip(input_ids, loss_mask, strict=True):
        if token == ids.im_patch:
            tokens = image_token_ids(next(images), cfg, ids)
            expanded_ids += tokens
            expanded_mask += [0] * len(tokens)
        else:
            expanded_ids.append(token)
            expanded_mask.append(mask)
    return expanded_ids, expanded_mask
