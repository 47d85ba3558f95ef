import pytest
import torch
from PIL import Image

from step3vl_train.processing.hf_processor import Step3VLHFProcessor
from step3vl_train.processing.images import load_image
from step3vl_train.processing.placeholders import PlaceholderMismatchError
from step3vl_train.processing.processor import collate, load_processor
from tests.conftest import REPO

TINY = str(REPO / "configs" / "processor" / "tiny.yaml")


@pytest.fixture(scope="module")
def processors():
    """(our processor, the transformers processor an export carries, both at the tiny settings)."""
    ours = load_processor("tiny", TINY)
    hf = Step3VLHFProcessor(load_processor("tiny").tokenizer, ours.chat_template, vars(ours.config))
    return ours, hf


def user(n_images: int, text: str) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image"}] * n_images + [{"type": "text", "text": text}]}]


def test_a_batch_of_prompts_gives_our_collated_inputs(processors):
    ours, hf = processors
    photo = load_image(REPO / "data" / "samples" / "chelsea.png")  # 6 crops at the tiny settings
    small = Image.new("RGB", (100, 80), (200, 30, 30))  # the global view alone
    chats = [(user(2, "Compare them."), [photo, small]), (user(1, "What is it?"), [small])]
    samples = [ours(messages, images, add_generation_prompt=True) for messages, images in chats]
    expected = collate(samples, ours.tokenizer.pad_token_id, padding_side="left").model_inputs(with_labels=False)
    hf.tokenizer.padding_side = "left"
    texts = [hf.apply_chat_template(messages, add_generation_prompt=True) for messages, _ in chats]
    got = hf(text=texts, images=[images for _, images in chats])
    assert got["num_patches"].tolist() == expected["num_patches"] == [6, 0, 0]
    for name in ("input_ids", "attention_mask", "pixel_values", "patch_pixel_values"):
        assert torch.equal(got[name], expected[name]), name


def test_text_alone_has_no_pixels(processors):
    hf = processors[1]
    got = hf(text=hf.apply_chat_template(user(0, "Hi"), add_generation_prompt=True))
    assert set(got) == {"input_ids", "attention_mask"}


def test_images_and_placeholders_must_agree_in_number(processors):
    hf = processors[1]
    text = hf.apply_chat_template(user(1, "What is it?"), add_generation_prompt=True)
    image = Image.new("RGB", (100, 80))
    with pytest.raises(PlaceholderMismatchError, match="text 0: 1 image placeholder"):
        hf(text=text, images=[])
    with pytest.raises(PlaceholderMismatchError, match="2 images for fewer"):
        hf(text=text, images=[image, image])
