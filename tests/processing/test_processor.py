import pytest
import torch
from PIL import Image

from step3vl_train.processing.config import ProcessorConfig
from step3vl_train.processing.images import load_image
from step3vl_train.processing.pixels import model_pixels
from step3vl_train.processing.placeholders import PlaceholderMismatchError
from step3vl_train.processing.processor import IGNORE_INDEX, Step3VLProcessor, collate
from step3vl_train.processing.tokenizer import load_tokenizer
from tests.conftest import REPO

TINY = ProcessorConfig(image_size=224, crop_size=168, max_image_size=672)


@pytest.fixture(scope="module")
def processor():
    return Step3VLProcessor(load_tokenizer("tiny"), TINY)


def conversation(n_images: int) -> list[dict]:
    content = [{"type": "image"}] * n_images + [{"type": "text", "text": "Compare them."}]
    return [
        {"role": "user", "content": content},
        {"role": "assistant", "reasoning_content": "Look closely.", "content": "They differ."},
    ]


def test_photo_with_crops(processor):
    photo = load_image(REPO / "data" / "samples" / "chelsea.png")  # 451x300 -> window 168, canvas 504x336
    sample = processor(conversation(1), [photo])
    ids = processor.image_token_ids
    assert sample.num_patches == [6]
    assert sample.patch_newline_mask.tolist() == [False, False, True, False, False, False]
    global_views, crops = model_pixels(sample.pixels)
    assert global_views.shape == (1, 3, 224, 224) and crops.shape == (6, 3, 168, 168)
    assert sample.pixels.sources == [(0, 300, 451)] and sample.pixels.windows == [(3 * 300 * 451, 6, 168)]
    assert int((sample.input_ids == ids.im_patch).sum()) == 6 * 9 + 16
    assert int((sample.input_ids == ids.patch_newline).sum()) == 1
    assert (sample.labels[sample.input_ids == ids.im_patch] == IGNORE_INDEX).all()
    trained = sample.input_ids[sample.labels != IGNORE_INDEX]
    assert processor.tokenizer.decode(trained) == "Look closely.\n</think>\n\nThey differ.<|im_end|>"


def test_images_without_crops_and_text_only(processor):
    small = Image.new("RGB", (200, 180), "red")  # fits the global view: no crops
    sample = processor(conversation(2), [small, small])
    global_views, crops = model_pixels(sample.pixels)
    assert sample.num_patches == [0, 0] and crops is None and global_views.shape == (2, 3, 224, 224)
    text_only = processor(conversation(0))
    assert text_only.pixels is None and text_only.num_patches == []
    assert collate([text_only], 0).model_inputs()["pixel_values"] is None


def test_placeholder_image_mismatch_names_the_sample(processor):
    with pytest.raises(PlaceholderMismatchError, match="shard-3/000017"):
        processor(conversation(2), [Image.new("RGB", (64, 64))], sample="shard-3/000017")


def test_collate_pads_and_keeps_image_order(processor):
    a = processor(conversation(1), [Image.new("RGB", (600, 300), "blue")])
    b = processor(conversation(0))
    c = processor(conversation(1), [Image.new("RGB", (100, 100), "green")])
    batch = collate([a, b, c], processor.tokenizer.pad_token_id)
    lengths = [len(s.input_ids) for s in (a, b, c)]
    assert batch.input_ids.shape == (3, max(lengths))
    assert batch.attention_mask.sum(1).tolist() == lengths
    assert (batch.labels[batch.attention_mask == 0] == IGNORE_INDEX).all()
    assert batch.num_patches == a.num_patches + c.num_patches
    # One flat buffer: a's views then c's, c's offsets shifted by a's bytes.
    assert torch.equal(batch.pixels.data, torch.cat([a.pixels.data, c.pixels.data]))
    shift = a.pixels.data.numel()
    assert batch.pixels.sources == a.pixels.sources + [(shift + o, h, w) for o, h, w in c.pixels.sources]
    assert batch.pixels.windows == a.pixels.windows + [(shift + o, n, w) for o, n, w in c.pixels.windows]
    inputs = batch.model_inputs()
    alone = [collate([s], processor.tokenizer.pad_token_id).model_inputs() for s in (a, c)]
    assert torch.equal(inputs["pixel_values"], torch.cat([x["pixel_values"] for x in alone]))
    assert torch.equal(inputs["patch_pixel_values"], alone[0]["patch_pixel_values"])  # c has no crops
    assert batch.view_sides() == [224, 224] + [168] * a.num_patches[0]


def test_model_inputs_places_everything_on_the_device(processor):
    sample = processor(conversation(1), [Image.new("RGB", (600, 300), "blue")])
    batch = collate([sample], processor.tokenizer.pad_token_id)
    inputs = batch.model_inputs(device="meta", pixel_dtype=torch.bfloat16)
    assert set(inputs) == {"input_ids", "attention_mask", "pixel_values", "patch_pixel_values", "num_patches", "labels"}
    tensors = [v for v in inputs.values() if torch.is_tensor(v)]
    assert len(tensors) == 5 and all(t.device.type == "meta" for t in tensors)
    assert inputs["pixel_values"].dtype == inputs["patch_pixel_values"].dtype == torch.bfloat16
    assert inputs["input_ids"].dtype == torch.long


def test_left_padding_for_generation(processor):
    a, b = processor(conversation(0)), processor([{"role": "user", "content": "Hi"}], add_generation_prompt=True)
    batch = collate([a, b], processor.tokenizer.pad_token_id, padding_side="left")
    assert batch.attention_mask[1].tolist() == [0] * (len(a.input_ids) - len(b.input_ids)) + [1] * len(b.input_ids)
    assert torch.equal(batch.input_ids[1, -len(b.input_ids) :], b.input_ids)
    with pytest.raises(ValueError, match="padding_side"):
        collate([a], 0, padding_side="middle")
