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


def view_tensor(view: Image.Image, side: int, cfg: ProcessorConfig) -> torch.Tensor:
    """RGB image -> (3, side, side): scale to [0, 1], normalise with the CLIP mean/std, then resize
    (bilinear, antialiased). Normalising before resizing is the released order."""
    pixels = torch.from_numpy(np.array(view, dtype=np.uint8)).permute(2, 0, 1).float() / 255.0
    mean = torch.tensor(cfg.mean).view(3, 1, 1)
    std = torch.tensor(cfg.std).view(3, 1, 1)
    normalised = (pixels - mean) / std
    resized = F.interpolate(normalised[None], size=(side, side), mode="bilinear", align_corners=False, antialias=True)
    return resized[0]


def image_to_pixels(image: Image.Image, cfg: ProcessorConfig) -> ImagePixels:
    """Plans the image's views and renders them; crops past the canvas border are black."""
    image = image.convert("RGB")
    plan = plan_crops(image.width, image.height, cfg)
    if plan.pad_to_square:
        square = Image.new("RGB", (max(image.size),) * 2, 0)
        square.paste(image, (0, 0))
        image = square
    image = image.resize(plan.image_size, Image.BILINEAR)
    canvas = image.resize(plan.canvas_size, Image.BILINEAR) if plan.canvas_size != image.size else image
    crops = [view_tensor(canvas.crop(box), cfg.crop_size, cfg) for box in plan.boxes]
    return ImagePixels(
        global_view=view_tensor(image, cfg.image_size, cfg),
        crops=torch.stack(crops) if crops else torch.zeros(0, 3, cfg.crop_size, cfg.crop_size),
        plan=plan,
    )
