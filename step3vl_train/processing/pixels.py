"""Pixel tensors for one image's global view and crops, transformed as the released processor does."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from step3vl_train.processing.config import ProcessorConfig
from step3vl_train.processing.crops import CropPlan, plan_crops


@dataclass
class ImagePixels:
    global_view: torch.Tensor  # (3, S, S) float32, S = cfg.image_size
    crops: torch.Tensor  # (n_crops, 3, s, s) float32, s = cfg.crop_size; (0, 3, s, s) without crops
    plan: CropPlan


def image_to_pixels(image: Image.Image, cfg: ProcessorConfig) -> ImagePixels:
    """Plans the image's views and renders them; crops past the canvas border are black.

    Each view is scaled to [0, 1], normalised with the CLIP mean/std and then resized (bilinear,
    antialiased): the released order. The per-channel normalisation is applied after the resize, to the
    smaller tensor; the resize's weights sum to one, so the two commute up to float32 rounding."""
    image = image.convert("RGB")
    plan = plan_crops(image.width, image.height, cfg)
    if plan.pad_to_square:
        square = Image.new("RGB", (max(image.size),) * 2, 0)
        square.paste(image, (0, 0))
        image = square
    if image.size != plan.image_size:
        image = image.resize(plan.image_size, Image.BILINEAR)
    global_view = _normalise(_resize(_raw_pixels(image)[None], cfg.image_size), cfg)[0]
    windows = torch.zeros(plan.num_crops, 3, plan.window, plan.window)
    if plan.num_crops:
        canvas_image = image.resize(plan.canvas_size, Image.BILINEAR) if plan.canvas_size != image.size else image
        canvas = _raw_pixels(canvas_image)
        for window, (x0, y0, x1, y1) in zip(windows, plan.boxes, strict=True):
            region = canvas[:, y0:y1, x0:x1]  # slicing clips at the canvas border; the rest stays black
            window[:, : region.shape[1], : region.shape[2]] = region
    crops = _normalise(_resize(windows, cfg.crop_size), cfg) if plan.num_crops else windows
    return ImagePixels(
        global_view=global_view,
        crops=crops if plan.num_crops else torch.zeros(0, 3, cfg.crop_size, cfg.crop_size),
        plan=plan,
    )


def _raw_pixels(image: Image.Image) -> torch.Tensor:
    """(3, H, W) float32 in [0, 255], channels-first and contiguous. PIL's per-band split is the cheapest
    way there, and interpolate reads channels-first floats about twice as fast as channels-last."""
    planes = np.stack([np.asarray(band) for band in image.split()])
    return torch.from_numpy(planes).float()


def _resize(pixels: torch.Tensor, side: int) -> torch.Tensor:
    """(N, 3, h, w) -> (N, 3, side, side); a batch already at `side` is returned as it is."""
    if pixels.shape[-2:] == (side, side):
        return pixels
    return F.interpolate(pixels, size=(side, side), mode="bilinear", align_corners=False, antialias=True)


def _normalise(pixels: torch.Tensor, cfg: ProcessorConfig) -> torch.Tensor:
    """[0, 255] -> (x / 255 - mean) / std per channel, as one contiguous (N, 3, S, S) tensor."""
    scale = (1.0 / (255.0 * torch.tensor(cfg.std))).view(3, 1, 1)
    shift = (-torch.tensor(cfg.mean) / torch.tensor(cfg.std)).view(3, 1, 1)
    return torch.addcmul(shift, pixels, scale).contiguous()
