"""The processor an export carries for transformers' `AutoProcessor`, as `processing_step3.py` (the released
checkpoint's name; model/remote_code.py writes it and the modules it imports). A process without step3vl_train
renders a chat with the template the model was trained with and turns text and images into the model's
inputs with the settings it was trained with (`image_settings`: config.py's fields), through this package's
own crop planning, placeholder expansion and pixels, so its inputs are those of `Step3VLProcessor`.

    processor = AutoProcessor.from_pretrained(export, trust_remote_code=True)
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(text=text, images=[image])
    model.generate(**inputs)
"""

from __future__ import annotations

from itertools import islice
from typing import Any

from PIL import Image
from transformers import BatchFeature, ProcessorMixin
from transformers.image_utils import load_image

from step3vl_train.processing.config import ProcessorConfig
from step3vl_train.processing.crops import CropPlan
from step3vl_train.processing.pixels import ImageViews, PixelSpec, PixelViews, image_views, model_pixels
from step3vl_train.processing.placeholders import ImageTokenIds, PlaceholderMismatchError, expand_image_placeholders


class Step3VLHFProcessor(ProcessorMixin):
    def __init__(self, tokenizer, chat_template: str | None = None, image_settings: dict[str, Any] | None = None):
        """`image_settings`: ProcessorConfig's fields; a missing one is the released processor's."""
        self.image_settings = dict(image_settings or {})
        self.config = ProcessorConfig.from_dict(self.image_settings)
        super().__init__(tokenizer, chat_template=chat_template)
        self.image_token_ids = ImageTokenIds.from_tokenizer(tokenizer)

    def __call__(
        self,
        text: str | list[str] | None = None,
        images: Any = None,
        videos: Any = None,
        audio: Any = None,
        return_tensors: str | None = "pt",
    ) -> BatchFeature:
        """`text`: a prompt or a list, rendered by the chat template: one `<im_patch>` an image. `images`: the
        prompts' images in order, flat or a list a prompt (PIL images, paths or URLs). Returns `input_ids` and
        `attention_mask` (B, L), padded on the tokenizer's `padding_side`, and with images `pixel_values`
        (N_images, 3, S, S), `num_patches` (N_images,) and, where there are crops, `patch_pixel_values`
        (ΣN_crops, 3, s, s): `model.generate(**inputs)`'s keyword arguments."""
        if videos is not None or audio is not None:
            raise ValueError("STEP3-VL reads text and images only")
        views = [image_views(image, self.config) for image in _flat_images(images)]
        prompts = [text] if isinstance(text, str) else list(text or [])
        data = dict(self.tokenizer.pad({"input_ids": self._expanded_ids(prompts, [view.plan for view in views])}))
        return BatchFeature(data | self._pixels(views) if views else data, tensor_type=return_tensors)

    def _expanded_ids(self, prompts: list[str], plans: list[CropPlan]) -> list[list[int]]:
        """Each prompt's token ids, each of its `<im_patch>` placeholders expanded for the next of `plans`."""
        remaining, rows = iter(plans), []
        for row, prompt in enumerate(prompts):
            ids = self.tokenizer(prompt, add_special_tokens=False)["input_ids"]
            own = list(islice(remaining, ids.count(self.image_token_ids.im_patch)))
            rows.append(
                expand_image_placeholders(ids, [0] * len(ids), own, self.config, self.image_token_ids, f"text {row}")[0]
            )
        if next(remaining, None) is not None:
            raise PlaceholderMismatchError(f"{len(plans)} images for fewer <im_patch> placeholders in the text")
        return rows

    def _pixels(self, views: list[ImageViews]) -> dict[str, Any]:
        pixel_values, crops = model_pixels(PixelViews.from_images(views, PixelSpec.from_config(self.config)))
        pixels = {"pixel_values": pixel_values, "num_patches": [view.plan.num_crops for view in views]}
        return pixels if crops is None else pixels | {"patch_pixel_values": crops}


def _flat_images(images: Any) -> list[Image.Image]:
    """Images given one, flat or a list a prompt (as `apply_chat_template` gives them), as PIL images."""
    if images is None:
        return []
    items = images if isinstance(images, list | tuple) else [images]
    flat = [image for item in items for image in (item if isinstance(item, list | tuple) else [item])]
    return [image if isinstance(image, Image.Image) else load_image(image) for image in flat]
