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
    global_view = _normalise(_resize(_chw(image).float()[None], cfg.image_size), cfg)[0]
    if not plan.num_crops:
        return ImagePixels(global_view, torch.zeros(0, 3, cfg.crop_size, cfg.crop_size), plan)
    canvas = image.resize(plan.canvas_size, Image.BILINEAR) if plan.canvas_size != image.size else image
    windows = _windows(canvas, plan)
    if plan.window == cfg.crop_size:  # the usual case: no resampling, one fused pass from uint8
        crops = _normalise(windows, cfg)
    else:
        crops = _normalise(_resize(windows.float(), cfg.crop_size), cfg)
    return ImagePixels(global_view, crops, plan)


def _chw(image: Image.Image) -> torch.Tensor:
    """(3, H, W) uint8, channels-first and contiguous (interpolate reads channels-first floats about twice
    as fast); PIL's per-band split is the cheapest way there."""
    return torch.from_numpy(np.stack([np.asarray(band) for band in image.split()]))


def _windows(canvas: Image.Image, plan: CropPlan) -> torch.Tensor:
    """(n_crops, 3, window, window) uint8 in the plan's row-major order; black where a window passes the
    canvas border. The snapped canvas is a whole grid of windows, so this is one strided view."""
    window = plan.window
    rows, cols = -(-canvas.height // window), -(-canvas.width // window)
    if rows * cols != plan.num_crops:
        raise ValueError(f"crop plan has {plan.num_crops} windows, the canvas holds {rows}x{cols}")
    grid = np.array(canvas)
    if grid.shape[:2] != (rows * window, cols * window):  # a side shorter than the window: pad it black
        grid = np.pad(grid, ((0, rows * window - canvas.height), (0, cols * window - canvas.width), (0, 0)))
    tiles = torch.from_numpy(grid).view(rows, window, cols, window, 3).permute(0, 2, 4, 1, 3)
    return tiles.reshape(rows * cols, 3, window, window)


def _resize(pixels: torch.Tensor, side: int) -> torch.Tensor:
    """(N, 3, h, w) float -> (N, 3, side, side); a batch already at `side` is returned as it is."""
    if pixels.shape[-2:] == (side, side):
        return pixels
    return F.interpolate(pixels, size=(side, side), mode="bilinear", align_corners=False, antialias=True)


def _normalise(pixels: torch.Tensor, cfg: ProcessorConfig) -> torch.Tensor:
    """[0, 255] (uint8 or float) -> (x / 255 - mean) / std per channel: a new contiguous float32 tensor."""
    scale = (1.0 / (255.0 * torch.tensor(cfg.std))).view(3, 1, 1)
    shift = (-torch.tensor(cfg.mean) / torch.tensor(cfg.std)).view(3, 1, 1)
    out = torch.empty(pixels.shape, dtype=torch.float32)
    return torch.addcmul(shift, pixels, scale, out=out)
