"""Crop planning of the released processor (`ImagePatcher`, spec section 3): pure geometry on sizes.

An image becomes one global view (the whole image squashed to a square) plus, when it is large or
elongated, non-overlapping square crops read row-major from a canvas snapped to the window size.
"""

from __future__ import annotations

from dataclasses import dataclass

from step3vl_train.processing.config import ProcessorConfig

# Images thinner than this along one side and more elongated than EXTREME_RATIO are padded square first.
EXTREME_MIN_SIDE = 32
EXTREME_RATIO = 4
# A canvas side rounds up to the next window multiple only if it overshoots by more than this fraction.
SNAP_FRACTION = 0.2


@dataclass(frozen=True)
class CropPlan:
    """Sizes are (width, height) in pixels; boxes are (x0, y0, x1, y1) on the canvas, row-major."""

    pad_to_square: bool  # pad right/bottom with black to a square before anything else
    image_size: tuple[int, int]  # after the pad and the max-size cap: the global view's source
    window: int  # crop side; 0 means global view only
    canvas_size: tuple[int, int]  # the image is resized to this before cropping
    boxes: tuple[tuple[int, int, int, int], ...]
    newline_mask: tuple[bool, ...]  # a <patch_newline> follows this crop (end of a row, not the last crop)

    @property
    def num_crops(self) -> int:
        return len(self.boxes)

    @property
    def num_newlines(self) -> int:
        return sum(self.newline_mask)


def plan_crops(width: int, height: int, cfg: ProcessorConfig) -> CropPlan:
    """Plans the views of a `width` x `height` image."""
    pad = min(width, height) < EXTREME_MIN_SIDE and not 1 / EXTREME_RATIO <= width / height <= EXTREME_RATIO
    if pad:
        width = height = max(width, height)
    if max(width, height) > cfg.max_image_size:
        scale = cfg.max_image_size / max(width, height)
        width, height = int(width * scale), int(height * scale)
    window = _window_size(max(width, height), min(width, height), cfg) if cfg.enable_patch else 0
    if window == 0:
        return CropPlan(pad, (width, height), 0, (width, height), (), ())
    canvas = (_snap(width, window), _snap(height, window))
    xs, ys = _starts(canvas[0], window), _starts(canvas[1], window)
    boxes = tuple((x, y, x + window, y + window) for y in ys for x in xs)
    newlines = tuple((i + 1) % len(xs) == 0 and i + 1 < len(boxes) for i in range(len(boxes)))
    return CropPlan(pad, (width, height), window, canvas, boxes, newlines)


def num_image_tokens(plan: CropPlan, cfg: ProcessorConfig) -> int:
    """Tokens one image occupies after expansion, markers included: 171 for a global-only 728 view."""
    return plan.num_crops * (cfg.crop_tokens + 2) + plan.num_newlines + cfg.global_tokens + 2


def _window_size(long: int, short: int, cfg: ProcessorConfig) -> int:
    if long < cfg.image_size or (long == cfg.image_size and cfg.crop_rule == "released"):
        return short if long / short > 1.5 else 0
    return min(short, cfg.crop_size) if long / short > EXTREME_RATIO else cfg.crop_size


def _snap(side: int, window: int) -> int:
    if side < window:
        return side
    whole = side // window
    return window * (whole + 1 if side / window - whole > SNAP_FRACTION else whole)


def _starts(side: int, window: int) -> range:
    # The snapped canvas side is a whole number of windows or shorter than one, so windows tile it exactly
    # (the released slide_window's clipping of the last start never triggers).
    return range(0, max(side, window) - window + 1, window)
