import pytest

from step3vl_train.processing.config import ProcessorConfig
from step3vl_train.processing.crops import num_image_tokens, plan_crops

RELEASED = ProcessorConfig()

# The spec's worked examples (section 3): size -> window, crop canvas, crops, newlines, image tokens.
TABLE = [
    ((728, 728), 0, None, 0, 0, 171),
    ((640, 480), 0, None, 0, 0, 171),
    ((728, 400), 400, (800, 400), 2, 0, 337),
    ((1000, 400), 504, (1008, 400), 2, 0, 337),
    ((1024, 768), 504, (1008, 1008), 4, 1, 504),
    ((1280, 720), 504, (1512, 1008), 6, 1, 670),
    ((1920, 1080), 504, (2016, 1008), 8, 1, 836),
    ((2000, 300), 300, (2100, 300), 7, 0, 752),
    ((4032, 3024), 504, (3024, 2520), 30, 4, 2665),
    ((3024, 3024), 504, (3024, 3024), 36, 5, 3164),
]


@pytest.mark.parametrize("size, window, canvas, crops, newlines, tokens", TABLE)
def test_spec_worked_examples(size, window, canvas, crops, newlines, tokens):
    plan = plan_crops(*size, RELEASED)
    assert plan.window == window
    if canvas is not None:
        assert plan.canvas_size == canvas
    assert (plan.num_crops, plan.num_newlines) == (crops, newlines)
    assert num_image_tokens(plan, RELEASED) == tokens


def test_cap_truncates_to_max_size():
    assert plan_crops(4032, 3024, RELEASED).image_size == (3024, 2268)


def test_boxes_are_row_major_with_newline_after_each_full_row():
    plan = plan_crops(1280, 720, RELEASED)  # canvas 1512x1008: 3 columns, 2 rows
    assert plan.boxes == (
        (0, 0, 504, 504),
        (504, 0, 1008, 504),
        (1008, 0, 1512, 504),
        (0, 504, 504, 1008),
        (504, 504, 1008, 1008),
        (1008, 504, 1512, 1008),
    )
    assert plan.newline_mask == (False, False, True, False, False, False)


@pytest.mark.parametrize("size", [(3024, 500), (1000, 400), (2000, 300), (731, 2900), (1500, 1499), (729, 729)])
def test_windows_tile_the_canvas_exactly(size):
    plan = plan_crops(*size, RELEASED)
    width, height = plan.canvas_size
    xs = sorted({box[0] for box in plan.boxes})
    ys = sorted({box[1] for box in plan.boxes})
    assert xs == list(range(0, max(width, plan.window) - plan.window + 1, plan.window))
    assert ys == list(range(0, max(height, plan.window) - plan.window + 1, plan.window))
    assert plan.num_crops == len(xs) * len(ys)
    assert all(box[2] - box[0] == box[3] - box[1] == plan.window for box in plan.boxes)


def test_global_only_when_patching_is_disabled():
    plan = plan_crops(4032, 3024, ProcessorConfig(enable_patch=False))
    assert plan.num_crops == 0 and num_image_tokens(plan, RELEASED) == 171


def test_extreme_aspect_is_padded_square_first():
    plan = plan_crops(600, 20, RELEASED)
    assert plan.pad_to_square and plan.image_size == (600, 600) and plan.window == 0
    assert not plan_crops(600, 200, RELEASED).pad_to_square


def test_tiny_processor_scales_the_same_rules():
    tiny = ProcessorConfig(image_size=224, crop_size=168, max_image_size=672)
    assert (tiny.global_tokens, tiny.crop_tokens) == (16, 9)
    plan = plan_crops(451, 300, tiny)
    assert (plan.window, plan.canvas_size, plan.num_crops, plan.num_newlines) == (168, (504, 336), 6, 1)


@pytest.mark.parametrize(
    "size, released, vllm",
    [
        ((728, 728), 171, 504),
        ((728, 600), 171, 337),
        ((728, 400), 337, 337),
        ((727, 400), 337, 337),
        ((729, 729), 504, 504),
    ],
)
def test_crop_rules_differ_only_at_a_long_side_of_exactly_728(size, released, vllm):
    """The released file plans with `long <= 728`, vLLM 0.33 with `long < 728` (tests/contract checks the
    latter against vLLM's own processor)."""
    for rule, tokens in (("released", released), ("vllm", vllm)):
        cfg = ProcessorConfig(crop_rule=rule)
        assert num_image_tokens(plan_crops(*size, cfg), cfg) == tokens


def test_unknown_crop_rule_is_an_error():
    with pytest.raises(ValueError, match="crop_rule"):
        ProcessorConfig(crop_rule="newest")
