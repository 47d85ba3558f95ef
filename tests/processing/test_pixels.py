import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from step3vl_train.processing.config import CLIP_MEAN, CLIP_STD, ProcessorConfig
from step3vl_train.processing.pixels import image_to_pixels

TINY = ProcessorConfig(image_size=224, crop_size=168, max_image_size=672)


def random_image(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def test_global_view_is_normalised_then_resized():
    image = random_image(300, 200)
    pixels = image_to_pixels(image, TINY)
    raw = torch.tensor(np.asarray(image), dtype=torch.float64).permute(2, 0, 1) / 255
    normalised = (raw - torch.tensor(CLIP_MEAN, dtype=torch.float64)[:, None, None]) / torch.tensor(
        CLIP_STD, dtype=torch.float64
    )[:, None, None]
    expected = F.interpolate(normalised[None], size=(224, 224), mode="bilinear", antialias=True)[0].float()
    torch.testing.assert_close(pixels.global_view, expected, rtol=0, atol=1e-4)
    # Not the HF-native port's order (PIL resize to uint8, then normalise): that rounds to 1/255 steps.
    pil_first = torch.tensor(np.asarray(image.resize((224, 224), Image.BILINEAR)), dtype=torch.float64)
    pil_first = (pil_first.permute(2, 0, 1) / 255 - torch.tensor(CLIP_MEAN, dtype=torch.float64)[:, None, None]) / (
        torch.tensor(CLIP_STD, dtype=torch.float64)[:, None, None]
    )
    assert (pil_first.float() - pixels.global_view).abs().max() > 1e-3


def test_shapes_and_crop_content():
    image = random_image(451, 300)  # canvas 504x336, window 168: 3x2 crops
    pixels = image_to_pixels(image, TINY)
    assert pixels.global_view.shape == (3, 224, 224)
    assert pixels.crops.shape == (6, 3, 168, 168)
    canvas = image.resize((504, 336), Image.BILINEAR)
    second_row_first = canvas.crop((0, 168, 168, 336))
    raw = torch.tensor(np.asarray(second_row_first), dtype=torch.float32).permute(2, 0, 1) / 255
    expected = (raw - torch.tensor(CLIP_MEAN)[:, None, None]) / torch.tensor(CLIP_STD)[:, None, None]
    torch.testing.assert_close(pixels.crops[3], expected, rtol=0, atol=1e-5)  # 168 -> 168: no resampling


def test_crop_past_the_canvas_is_black():
    image = Image.new("RGB", (500, 150), (255, 255, 255))  # window 168 > canvas height 150
    pixels = image_to_pixels(image, TINY)
    assert pixels.plan.canvas_size == (504, 150) and pixels.crops.shape[0] == 3
    black = -torch.tensor(CLIP_MEAN) / torch.tensor(CLIP_STD)
    bottom = pixels.crops[0][:, 152:, :]  # rows 150..167 of the window lie outside the image
    torch.testing.assert_close(bottom, black[:, None, None].expand_as(bottom), rtol=0, atol=1e-5)


def test_without_crops():
    pixels = image_to_pixels(random_image(100, 80), TINY)
    assert pixels.crops.shape == (0, 3, 168, 168)


@pytest.mark.parametrize("mode", ["L", "RGBA", "P"])
def test_other_modes_become_rgb(mode):
    assert image_to_pixels(Image.new(mode, (64, 64)), TINY).global_view.shape == (3, 224, 224)
