"""Samples -> token layouts (cheap: image headers only) and, for the packs that are emitted, tensors."""

from __future__ import annotations

import io
from dataclasses import dataclass

from jinja2 import TemplateError
from PIL import Image, UnidentifiedImageError

from step3vl_train.data.config import PackingConfig
from step3vl_train.data.schema import Sample
from step3vl_train.data.skips import SkippedSample
from step3vl_train.processing.images import ImageError, load_image
from step3vl_train.processing.placeholders import PlaceholderMismatchError
from step3vl_train.processing.processor import ProcessedSample, Step3VLProcessor, TokenLayout


@dataclass
class EncodedSample:
    key: str
    source: str  # the mixture source it was drawn from
    layout: TokenLayout
    images: list[bytes]  # encoded; decoded only when the sample's pack is emitted
    truncated: bool

    def __len__(self) -> int:
        return len(self.layout)

    @property
    def num_images(self) -> int:
        return len(self.layout.plans)

    @property
    def num_views(self) -> int:
        return self.layout.num_views


class SampleEncoder:
    def __init__(self, processor: Step3VLProcessor, packing: PackingConfig):
        self.processor = processor
        self.packing = packing

    def encode(self, sample: Sample, source: str) -> EncodedSample:
        """Lays the sample out and applies the overflow policy; raises SkippedSample."""
        sizes = [_image_size(sample.key, data) for data in sample.images]
        try:
            layout = self.processor.layout(sample.messages, sizes, document=sample.text, sample=sample.key)
        except PlaceholderMismatchError as err:
            raise SkippedSample("placeholder_mismatch", sample.key, str(err)) from err
        except (TemplateError, TypeError, KeyError) as err:
            raise SkippedSample("bad_schema", sample.key, f"chat template failed: {err}") from err
        if layout.num_views > self.packing.max_views_per_pack or len(layout.plans) > self.packing.max_images_per_pack:
            raise SkippedSample(
                "too_many_images",
                sample.key,
                f"{len(layout.plans)} images, {layout.num_views} ViT views; a pack holds "
                f"{self.packing.max_images_per_pack} and {self.packing.max_views_per_pack}",
            )
        truncated = len(layout) > self.packing.seq_len
        if truncated:
            if self.packing.overflow == "skip":
                raise SkippedSample("too_long", sample.key, f"{len(layout)} tokens > seq_len {self.packing.seq_len}")
            layout = layout.truncated(self.packing.seq_len)
            if not any(layout.loss_mask[1:]):
                raise SkippedSample("too_long", sample.key, f"nothing left to learn in the first {len(layout)} tokens")
        kept_images = sample.images[: len(layout.plans)]
        return EncodedSample(sample.key, source, layout, kept_images, truncated)

    def render(self, sample: EncodedSample) -> ProcessedSample:
        """Decodes the images in full and builds the tensors; raises SkippedSample("corrupt_image")."""
        images = []
        for i, data in enumerate(sample.images):
            try:
                images.append(load_image(data, name=f"{sample.key} image {i}"))
            except ImageError as err:
                raise SkippedSample("corrupt_image", sample.key, str(err)) from err
        try:
            return self.processor.render(sample.layout, images)
        except ValueError as err:  # the full decode disagrees with the header's size
            raise SkippedSample("corrupt_image", sample.key, str(err)) from err


def _image_size(key: str, data: bytes) -> tuple[int, int]:
    """(width, height) from the header; the full decode waits for the pack the sample lands in."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            width, height = image.size
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise SkippedSample("corrupt_image", key, f"unreadable image header ({err})") from err
    if min(width, height) == 0:
        raise SkippedSample("corrupt_image", key, f"image has a zero side ({width}x{height})")
    return width, height


def sample_record(sample: Sample) -> dict:
    """The schema's JSON for a sample, without empty optional fields."""
    record = {"messages": sample.messages} if sample.messages is not None else {"text": sample.text}
    optional = {
        "source": sample.source,
        "answer": sample.answer,
        "reward": sample.reward,
        "boxes": sample.boxes,
        "points": sample.points,
        "reference": sample.reference,
        "chosen": sample.chosen,
        "rejected": sample.rejected,
    }
    return {**record, **{k: v for k, v in optional.items() if v not in (None, [])}}


def image_suffix(key: str, data: bytes) -> str:
    """The file suffix webdataset readers expect for these image bytes (jpg, png, webp, ...)."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            kind = (image.format or "").lower()
    except (UnidentifiedImageError, OSError) as err:
        raise SkippedSample("corrupt_image", key, f"unreadable image header ({err})") from err
    return {"jpeg": "jpg", "tiff": "tif"}.get(kind, kind)
