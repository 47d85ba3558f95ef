"""Images with known ground truth, drawn with PIL: shapes with boxes, rendered text, bar charts."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFont

COLORS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "orange": (240, 150, 30),
    "purple": (140, 60, 180),
    "black": (20, 20, 20),
}
SHAPES = ("circle", "square", "triangle")


@dataclass
class Shape:
    kind: str
    color: str
    box: tuple[int, int, int, int]  # x0, y0, x1, y1 in pixels

    @property
    def center(self) -> tuple[int, int]:
        return (self.box[0] + self.box[2]) // 2, (self.box[1] + self.box[3]) // 2


def font(size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=size)


def image_size(rng: np.random.Generator) -> tuple[int, int]:
    return int(rng.integers(8, 41)) * 32, int(rng.integers(8, 31)) * 32  # 256..1280 x 256..960


def draw_shapes(
    rng: np.random.Generator, count: int, kinds: tuple[str, ...] = SHAPES
) -> tuple[Image.Image, list[Shape]]:
    """Non-overlapping shapes on a light background (fewer than `count` if they do not fit)."""
    width, height = image_size(rng)
    image = Image.new("RGB", (width, height), tuple(int(c) for c in rng.integers(225, 256, 3)))
    draw = ImageDraw.Draw(image)
    shapes: list[Shape] = []
    for _ in range(count * 20):
        if len(shapes) == count:
            break
        side = int(rng.integers(min(width, height) // 10, min(width, height) // 4))
        x0, y0 = int(rng.integers(0, width - side)), int(rng.integers(0, height - side))
        box = (x0, y0, x0 + side, y0 + side)
        if any(_overlap(box, other.box) for other in shapes):
            continue
        shape = Shape(str(rng.choice(kinds)), str(rng.choice(list(COLORS))), box)
        _draw_shape(draw, shape)
        shapes.append(shape)
    return image, shapes


def draw_one_shape(rng: np.random.Generator, colors: tuple[str, ...], size: int = 224) -> tuple[Image.Image, Shape]:
    """One large shape (half to nine tenths of the side) of one of `colors` on a light square background:
    the global view alone shows it (no crops), for questions a small model can answer."""
    image = Image.new("RGB", (size, size), tuple(int(c) for c in rng.integers(225, 256, 3)))
    side = int(rng.integers(size // 2, size * 9 // 10))
    x0, y0 = (int(v) for v in rng.integers(0, size - side, 2))
    shape = Shape(str(rng.choice(SHAPES)), str(rng.choice(colors)), (x0, y0, x0 + side, y0 + side))
    _draw_shape(ImageDraw.Draw(image), shape)
    return image, shape


def _draw_shape(draw: ImageDraw.ImageDraw, shape: Shape) -> None:
    x0, y0, x1, y1 = shape.box
    fill = COLORS[shape.color]
    if shape.kind == "circle":
        draw.ellipse(shape.box, fill=fill)
    elif shape.kind == "square":
        draw.rectangle((x0, y0, x1 - 1, y1 - 1), fill=fill)
    else:
        draw.polygon([((x0 + x1) // 2, y0), (x0, y1 - 1), (x1 - 1, y1 - 1)], fill=fill)


def _overlap(a: tuple[int, ...], b: tuple[int, ...]) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def normalised_box(box: tuple[int, ...], size: tuple[int, int]) -> list[int]:
    w, h = size
    return [
        min(999, box[0] * 1000 // w),
        min(999, box[1] * 1000 // h),
        min(999, box[2] * 1000 // w),
        min(999, box[3] * 1000 // h),
    ]


def render_text_image(lines: list[str], size: int = 28) -> Image.Image:
    face = font(size)
    width = max(int(face.getlength(line)) for line in lines) + 2 * size
    image = Image.new("RGB", (max(width, 64), (len(lines) + 1) * int(size * 1.4)), "white")
    draw = ImageDraw.Draw(image)
    for i, line in enumerate(lines):
        draw.text((size, size // 2 + i * int(size * 1.4)), line, font=face, fill="black")
    return image


def draw_bar_chart(rng: np.random.Generator) -> tuple[Image.Image, dict[str, int]]:
    labels = [chr(ord("A") + i) for i in range(int(rng.integers(3, 7)))]
    values = {label: int(rng.integers(1, 50)) for label in labels}
    width, height = 120 * len(labels) + 80, 480
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    face = font(22)
    scale = 360 / max(values.values())
    for i, (label, value) in enumerate(values.items()):
        x0 = 60 + i * 120
        top = 420 - int(value * scale)
        draw.rectangle((x0, top, x0 + 80, 420), fill=COLORS[list(COLORS)[i % len(COLORS)]])
        draw.text((x0 + 30, 430), label, font=face, fill="black")
        draw.text((x0 + 25, top - 28), str(value), font=face, fill="black")
    draw.line((50, 420, width - 20, 420), fill="black", width=2)
    return image, values
