"""Reading images from files or bytes, with errors that name the file or sample."""

from __future__ import annotations

import io
import os

from PIL import Image, UnidentifiedImageError


class ImageError(ValueError):
    """An image that cannot be used: missing, empty, corrupt or truncated, or with a zero side."""


def load_image(source: str | os.PathLike | bytes, name: str | None = None) -> Image.Image:
    """Decodes an image fully (so truncation fails here, not mid-training) and returns it as RGB.
    `name` labels bytes in errors, e.g. the sample key they came from."""
    label = name or (str(source) if not isinstance(source, bytes) else "<bytes>")
    try:
        data = source if isinstance(source, bytes) else open(source, "rb").read()  # noqa: SIM115
    except OSError as err:
        raise ImageError(f"{label}: cannot read image ({err.strerror or err})") from err
    if not data:
        raise ImageError(f"{label}: empty image file (0 bytes)")
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            rgb = image.convert("RGB")
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise ImageError(f"{label}: corrupt or unreadable image ({err})") from err
    if min(rgb.size) == 0:
        raise ImageError(f"{label}: image has a zero side ({rgb.width}x{rgb.height})")
    return rgb
