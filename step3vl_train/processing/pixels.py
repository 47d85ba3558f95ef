"""Pixels of each image's global view and crops, transformed as the released processor does, in two halves.

The worker half (`image_views`, `PixelViews`) prepares uint8 views up to, not including, their last
resize: bytes a quarter the size of float32 and more (a crop-heavy image's global view is still at its
source size), so a pack crosses DataLoader shared memory and the host-to-device copy small. The device half
(`model_pixels`) resizes and normalises them where the batch is placed, in float32: the same ops as the
float path the workers ran before, so on the CPU the result is bitwise that path's.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import get_worker_info

from step3vl_train.processing.config import ProcessorConfig
from step3vl_train.processing.crops import CropPlan, plan_crops


@dataclass(frozen=True)
class PixelSpec:
    """What the device half needs to finish the views: sides in pixels and the per-channel mean/std."""

    image_size: int  # global view side S
    crop_size: int  # crop side s
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    @classmethod
    def from_config(cls, cfg: ProcessorConfig) -> PixelSpec:
        return cls(cfg.image_size, cfg.crop_size, cfg.mean, cfg.std)


@dataclass
class ImageViews:
    """One image's views before their last resize."""

    source: torch.Tensor  # (3, h, w) uint8: the image at plan.image_size, the global view's source
    windows: torch.Tensor  # (n_crops, 3, w, w) uint8, w = plan.window; (0, 3, 0, 0) without crops
    plan: CropPlan


def image_views(image: Image.Image, cfg: ProcessorConfig) -> ImageViews:
    """Plans the image's views and cuts them out as uint8; crops past the canvas border are black."""
    image = image.convert("RGB")
    plan = plan_crops(image.width, image.height, cfg)
    if plan.pad_to_square:
        square = Image.new("RGB", (max(image.size),) * 2, 0)
        square.paste(image, (0, 0))
        image = square
    if image.size != plan.image_size:
        image = image.resize(plan.image_size, Image.BILINEAR)
    if not plan.num_crops:
        return ImageViews(_chw(image), torch.zeros(0, 3, 0, 0, dtype=torch.uint8), plan)
    canvas = image.resize(plan.canvas_size, Image.BILINEAR) if plan.canvas_size != image.size else image
    return ImageViews(_chw(image), _windows(canvas, plan), plan)


@dataclass
class PixelViews:
    """The uint8 views of a sample's or a batch's images in one flat buffer (one shared-memory segment on
    the way out of a DataLoader worker, one host-to-device copy), images in placeholder order."""

    data: torch.Tensor  # (total,) uint8: each image's source, then its windows, image after image
    sources: list[tuple[int, int, int]]  # per image: (offset, h, w) of its (3, h, w) source in data
    windows: list[tuple[int, int, int]]  # per image: (offset, n, w) of its (n, 3, w, w) windows in data
    spec: PixelSpec
    # Set where these are only some of a batch's views (`select`): the (global view, crop) they start at.
    view_offset: tuple[int, int] | None = None

    @classmethod
    def from_images(cls, images: Sequence[ImageViews], spec: PixelSpec) -> PixelViews:
        """Copies the images' views into one buffer."""
        parts, sources, windows, at = [], [], [], 0
        for image in images:
            _, h, w = image.source.shape
            sources.append((at, h, w))
            at += image.source.numel()
            windows.append((at, image.windows.shape[0], image.windows.shape[-1]))
            at += image.windows.numel()
            parts += [image.source.reshape(-1), image.windows.reshape(-1)]
        return cls(torch.cat(parts), sources, windows, spec)

    @classmethod
    def cat(cls, views: Sequence[PixelViews]) -> PixelViews:
        """The views one after the other, offsets shifted. Inside a DataLoader worker the buffer is made in
        shared memory, as torch's own collate does: the pixels (the bulk of a batch) are then copied once
        on their way out, into one segment (hundreds of per-sample segments would each hold a descriptor)."""
        if len({v.spec for v in views}) != 1:
            raise ValueError(f"cannot concatenate views made with different specs: {[v.spec for v in views]}")
        if len(views) == 1 and get_worker_info() is None:
            return views[0]
        sources, windows, at = [], [], 0
        for v in views:
            sources += [(at + offset, h, w) for offset, h, w in v.sources]
            windows += [(at + offset, n, w) for offset, n, w in v.windows]
            at += v.data.numel()
        out = None
        if get_worker_info() is not None:
            out = torch.empty(0, dtype=torch.uint8).set_(torch.UntypedStorage._new_shared(at))
        return cls(torch.cat([v.data for v in views], out=out), sources, windows, views[0].spec)

    def pin_memory(self) -> PixelViews:
        """A copy with the buffer in page-locked memory, so that its copy to the GPU can be asynchronous."""
        return replace(self, data=self.data.pin_memory())

    def select(self, globals_: range, crops: range) -> PixelViews:
        """Only these global views (image indices) and crops (indices over all images' crops, in order), in
        a buffer of their own: a sequence-parallel rank's share of a batch (train/sequence_parallel.py)."""
        parts, sources, windows, at = [], [], [], 0
        for offset, h, w in self.sources[globals_.start : globals_.stop]:
            parts.append(self.data[offset : offset + 3 * h * w])
            sources.append((at, h, w))
            at += 3 * h * w
        first = 0  # the index of the image's first crop among all crops
        for offset, n, w in self.windows:
            start, stop = max(crops.start - first, 0), min(crops.stop - first, n)
            if start < stop:
                size = 3 * w * w
                parts.append(self.data[offset + start * size : offset + stop * size])
                windows.append((at, stop - start, w))
                at += (stop - start) * size
            first += n
        data = torch.cat(parts) if parts else self.data.new_empty(0)
        return PixelViews(data, sources, windows, self.spec, (globals_.start, crops.start))

    @property
    def num_crops(self) -> int:
        return sum(n for _, n, _ in self.windows)


def model_pixels(
    views: PixelViews, device: torch.device | str | None = None, dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(N_images, 3, S, S) global views and (ΣN_crops, 3, s, s) crops (None without crops) in `dtype` on
    `device` (None: where the views are), normalised with the spec's mean/std. Views `select`ed from a
    batch give both tensors, empty (0, 3, side, side) for a kind with none: their sides count tokens.

    The buffer moves in one copy; each view is resized (bilinear, antialiased) and normalised in float32,
    piece by piece into the output, so memory peaks at the output plus one image's float views. Scaling
    to [0, 1] and normalising after the resize, not before as the released processor does, is the same
    up to float32 rounding: the resize's weights sum to one."""
    spec = views.spec
    data = views.data if device is None else views.data.to(device, non_blocking=True)
    scale = (1.0 / (255.0 * torch.tensor(spec.std))).view(3, 1, 1).to(data.device)
    shift = (-torch.tensor(spec.mean) / torch.tensor(spec.std)).view(3, 1, 1).to(data.device)
    side = spec.image_size
    globals_ = torch.empty(len(views.sources), 3, side, side, dtype=dtype, device=data.device)
    for row, (offset, h, w) in enumerate(views.sources):
        source = data[offset : offset + 3 * h * w].view(1, 3, h, w)
        _normalise(_resize(source.float(), side), scale, shift, out=globals_[row : row + 1])
    if not views.num_crops and views.view_offset is None:
        return globals_, None
    side = spec.crop_size
    crops = torch.empty(views.num_crops, 3, side, side, dtype=dtype, device=data.device)
    at = 0
    for offset, n, w in views.windows:
        if not n:
            continue
        windows = data[offset : offset + n * 3 * w * w].view(n, 3, w, w)
        # At the crop size (the usual case) the uint8 windows go straight into the normalisation: one pass.
        pixels = windows if w == side else _resize(windows.float(), side)
        _normalise(pixels, scale, shift, out=crops[at : at + n])
        at += n
    return globals_, crops


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


def _normalise(pixels: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, out: torch.Tensor) -> None:
    """[0, 255] (uint8 or float) -> pixels * scale + shift = (x / 255 - mean) / std, computed in float32 and
    written into `out`, cast to its dtype."""
    if out.dtype == torch.float32:
        torch.addcmul(shift, pixels, scale, out=out)
    else:
        out.copy_(torch.addcmul(shift, pixels, scale))
