import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from step3vl_train.processing.config import CLIP_MEAN, CLIP_STD, ProcessorConfig
from step3vl_train.processing.crops import plan_crops
from step3vl_train.processing.pixels import PixelSpec, PixelViews, _chw, _windows, image_views, model_pixels

TINY = ProcessorConfig(image_size=224, crop_size=168, max_image_size=672)
RELEASED = ProcessorConfig()


def random_image(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def pixels(images: list[Image.Image], cfg: ProcessorConfig) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The new path: uint8 views, normalised on the CPU."""
    return model_pixels(
        PixelViews.from_images([image_views(image, cfg) for image in images], PixelSpec.from_config(cfg))
    )


def reference_pixels(image: Image.Image, cfg: ProcessorConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """The float path the DataLoader workers ran before pixels travelled as uint8, kept verbatim:
    (3, S, S) global view and (n_crops, 3, s, s) crops, float32."""

    def resize(pixels, side):
        if pixels.shape[-2:] == (side, side):
            return pixels
        return F.interpolate(pixels, size=(side, side), mode="bilinear", align_corners=False, antialias=True)

    def normalise(pixels):
        scale = (1.0 / (255.0 * torch.tensor(cfg.std))).view(3, 1, 1)
        shift = (-torch.tensor(cfg.mean) / torch.tensor(cfg.std)).view(3, 1, 1)
        out = torch.empty(pixels.shape, dtype=torch.float32)
        return torch.addcmul(shift, pixels, scale, out=out)

    image = image.convert("RGB")
    plan = plan_crops(image.width, image.height, cfg)
    if plan.pad_to_square:
        square = Image.new("RGB", (max(image.size),) * 2, 0)
        square.paste(image, (0, 0))
        image = square
    if image.size != plan.image_size:
        image = image.resize(plan.image_size, Image.BILINEAR)
    global_view = normalise(resize(_chw(image).float()[None], cfg.image_size))[0]
    if not plan.num_crops:
        return global_view, torch.zeros(0, 3, cfg.crop_size, cfg.crop_size)
    canvas = image.resize(plan.canvas_size, Image.BILINEAR) if plan.canvas_size != image.size else image
    windows = _windows(canvas, plan)
    if plan.window == cfg.crop_size:
        crops = normalise(windows)
    else:
        crops = normalise(resize(windows.float(), cfg.crop_size))
    return global_view, crops


@pytest.mark.parametrize(
    "sizes",
    [
        [(600, 400)],  # global view only, resized up to 728
        [(1920, 1080)],  # 8 crops at window 504 == crop size: no resampling
        [(2000, 300), (728, 400)],  # thin: windows 300 and 400 < 504, resized up
        [(1000, 20)],  # extreme aspect: padded square first
        [(4000, 3000)],  # over 3024: capped first, 30 crops
        [(1920, 1080), (600, 400), (1920, 1080)],  # several images, two of one size
    ],
)
def test_uint8_views_normalised_on_the_device_equal_the_float_path(sizes):
    images = [random_image(w, h, seed) for seed, (w, h) in enumerate(sizes)]
    globals_, crops = pixels(images, RELEASED)
    expected = [reference_pixels(image, RELEASED) for image in images]
    torch.testing.assert_close(globals_, torch.stack([g for g, _ in expected]), rtol=0, atol=1e-6)
    expected_crops = torch.cat([c for _, c in expected])
    if expected_crops.shape[0]:
        torch.testing.assert_close(crops, expected_crops, rtol=0, atol=1e-6)
    else:
        assert crops is None


def test_uint8_views_cost_a_quarter_of_float_crops_and_the_source_at_its_size():
    image = random_image(1920, 1080)
    views = image_views(image, RELEASED)
    uint8 = PixelViews.from_images([views], PixelSpec.from_config(RELEASED)).data
    globals_, crops = reference_pixels(image, RELEASED)
    assert uint8.dtype == torch.uint8 and views.windows.shape == (8, 3, 504, 504)
    assert views.windows.nbytes * 4 == crops.nbytes  # 504 windows need no resize: exactly a quarter
    # The global view's source travels at the image's size (1920x1080 here), not at 728: about the float
    # view's bytes, since the last resize is what the device does.
    assert views.source.nbytes == 3 * 1080 * 1920 and uint8.nbytes == views.source.nbytes + views.windows.nbytes
    assert uint8.nbytes < 0.41 * (globals_.nbytes + crops.nbytes)


def test_model_pixels_casts_after_float32_math():
    images = [random_image(1920, 1080)]
    globals_, crops = pixels(images, RELEASED)
    views = PixelViews.from_images([image_views(image, RELEASED) for image in images], PixelSpec.from_config(RELEASED))
    half_globals, half_crops = model_pixels(views, "cpu", torch.bfloat16)
    assert half_globals.dtype == half_crops.dtype == torch.bfloat16
    assert torch.equal(half_globals, globals_.bfloat16()) and torch.equal(half_crops, crops.bfloat16())


def test_global_view_is_normalised_then_resized():
    image = random_image(300, 200)
    global_view = pixels([image], TINY)[0][0]
    raw = torch.tensor(np.asarray(image), dtype=torch.float64).permute(2, 0, 1) / 255
    normalised = (raw - torch.tensor(CLIP_MEAN, dtype=torch.float64)[:, None, None]) / torch.tensor(
        CLIP_STD, dtype=torch.float64
    )[:, None, None]
    expected = F.interpolate(normalised[None], size=(224, 224), mode="bilinear", antialias=True)[0].float()
    torch.testing.assert_close(global_view, expected, rtol=0, atol=1e-4)
    # Not the HF-native port's order (PIL resize to uint8, then normalise): that rounds to 1/255 steps.
    pil_first = torch.tensor(np.asarray(image.resize((224, 224), Image.BILINEAR)), dtype=torch.float64)
    pil_first = (pil_first.permute(2, 0, 1) / 255 - torch.tensor(CLIP_MEAN, dtype=torch.float64)[:, None, None]) / (
        torch.tensor(CLIP_STD, dtype=torch.float64)[:, None, None]
    )
    assert (pil_first.float() - global_view).abs().max() > 1e-3


def test_shapes_and_crop_content():
    image = random_image(451, 300)  # canvas 504x336, window 168: 3x2 crops
    global_view, crops = pixels([image], TINY)
    assert global_view.shape == (1, 3, 224, 224)
    assert crops.shape == (6, 3, 168, 168)
    canvas = image.resize((504, 336), Image.BILINEAR)
    second_row_first = canvas.crop((0, 168, 168, 336))
    raw = torch.tensor(np.asarray(second_row_first), dtype=torch.float32).permute(2, 0, 1) / 255
    expected = (raw - torch.tensor(CLIP_MEAN)[:, None, None]) / torch.tensor(CLIP_STD)[:, None, None]
    torch.testing.assert_close(crops[3], expected, rtol=0, atol=1e-5)  # 168 -> 168: no resampling


def test_crop_past_the_canvas_is_black():
    image = Image.new("RGB", (500, 150), (255, 255, 255))  # window 168 > canvas height 150
    views = image_views(image, TINY)
    assert views.plan.canvas_size == (504, 150) and views.windows.shape == (3, 3, 168, 168)
    crops = pixels([image], TINY)[1]
    black = -torch.tensor(CLIP_MEAN) / torch.tensor(CLIP_STD)
    bottom = crops[0][:, 152:, :]  # rows 150..167 of the window lie outside the image
    torch.testing.assert_close(bottom, black[:, None, None].expand_as(bottom), rtol=0, atol=1e-5)


def test_without_crops():
    views = image_views(random_image(100, 80), TINY)
    assert views.source.shape == (3, 80, 100) and views.windows.shape[0] == 0
    assert pixels([random_image(100, 80)], TINY)[1] is None


@pytest.mark.parametrize("mode", ["L", "RGBA", "P"])
def test_other_modes_become_rgb(mode):
    assert image_views(Image.new(mode, (64, 64)), TINY).source.shape == (3, 64, 64)


def test_cat_shifts_offsets_and_refuses_mixed_specs():
    a = PixelViews.from_images([image_views(random_image(451, 300), TINY)], PixelSpec.from_config(TINY))
    b = PixelViews.from_images([image_views(random_image(100, 80, 1), TINY)], PixelSpec.from_config(TINY))
    both = PixelViews.cat([a, b])
    assert torch.equal(both.data, torch.cat([a.data, b.data]))
    assert both.sources == a.sources + [(a.data.numel(), 80, 100)]
    assert both.windows == a.windows + [(a.data.numel() + 3 * 80 * 100, 0, 0)]
    globals_, crops = model_pixels(both)
    assert torch.equal(globals_, torch.cat([model_pixels(a)[0], model_pixels(b)[0]]))
    assert torch.equal(crops, model_pixels(a)[1])  # b has no crops
    other = PixelViews(b.data, b.sources, b.windows, PixelSpec.from_config(RELEASED))
    with pytest.raises(ValueError, match="different specs"):
        PixelViews.cat([a, other])


def test_a_selection_of_views_holds_those_views_alone():
    """A sequence-parallel rank's share (train/sequence_parallel.py): some global views and a run of crops
    that starts inside one image's and ends inside another's, in a buffer of their own."""
    images = [random_image(400, 300, 1), random_image(150, 150, 2), random_image(600, 200, 3)]
    views = PixelViews.from_images([image_views(image, TINY) for image in images], PixelSpec.from_config(TINY))
    globals_, crops = model_pixels(views)
    assert len(globals_) == 3 and len(crops) > 4
    part = views.select(range(1, 3), range(2, len(crops) - 1))
    part_globals, part_crops = model_pixels(part)
    assert part.view_offset == (1, 2) and part.data.numel() < views.data.numel()
    torch.testing.assert_close(part_globals, globals_[1:3], rtol=0, atol=0)
    torch.testing.assert_close(part_crops, crops[2:-1], rtol=0, atol=0)
    none_globals, none_crops = model_pixels(views.select(range(0), range(0)))
    assert none_globals.shape == (0, 3, 224, 224) and none_crops.shape == (0, 3, 168, 168)  # sides count tokens
