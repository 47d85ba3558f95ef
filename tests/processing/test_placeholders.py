import pytest

from step3vl_train.processing.config import ProcessorConfig
from step3vl_train.processing.crops import num_image_tokens, plan_crops
from step3vl_train.processing.placeholders import (
    ImageTokenIds,
    PlaceholderMismatchError,
    expand_image_placeholders,
    image_token_ids,
)

IDS = ImageTokenIds(im_patch=5, im_start=6, im_end=7, patch_start=8, patch_end=9, patch_newline=10)
CFG = ProcessorConfig()


def runs(tokens: list[int]) -> list[tuple[int, int]]:
    """Run-length encoding, to read layouts at a glance."""
    out: list[tuple[int, int]] = []
    for token in tokens:
        if out and out[-1][0] == token:
            out[-1] = (token, out[-1][1] + 1)
        else:
            out.append((token, 1))
    return out


def test_global_only_layout():
    assert runs(image_token_ids(plan_crops(640, 480, CFG), CFG, IDS)) == [(6, 1), (5, 169), (7, 1)]


def test_four_crops_layout():
    plan = plan_crops(1024, 768, CFG)  # 2x2 crops, newline after the first row
    tokens = image_token_ids(plan, CFG, IDS)
    crop = [(8, 1), (5, 81), (9, 1)]
    assert runs(tokens) == crop + crop + [(10, 1)] + crop + crop + [(6, 1), (5, 169), (7, 1)]
    assert len(tokens) == num_image_tokens(plan, CFG) == 504


def test_expansion_keeps_text_and_masks_images():
    plans = [plan_crops(640, 480, CFG), plan_crops(1000, 400, CFG)]
    ids, mask = expand_image_placeholders([1, 5, 2, 5, 3], [0, 0, 1, 0, 1], plans, CFG, IDS, "s")
    assert len(ids) == 3 + 171 + 337
    assert ids[0] == 1 and ids[172] == 2 and ids[-1] == 3
    assert [m for t, m in zip(ids, mask, strict=True) if t in (1, 2, 3)] == [0, 1, 1]
    assert sum(mask) == 2


def test_mismatch_names_the_sample():
    with pytest.raises(PlaceholderMismatchError, match="sample-9: 1 image placeholder.*2 image"):
        expand_image_placeholders([1, 5], [0, 0], [plan_crops(9, 9, CFG)] * 2, CFG, IDS, "sample-9")
