"""A model directory carries its processor: transformers' AutoProcessor opens it without step3vl_train and
gives the model our processor's inputs; our tools read its settings back and refuse ones the model cannot take."""

import json
import os

import pytest
import torch
from PIL import Image

from step3vl_train.model import Step3VLForConditionalGeneration
from step3vl_train.processing.images import load_image
from step3vl_train.processing.model_processor import model_settings, save_processor, saved_settings
from step3vl_train.processing.processor import collate, load_processor
from step3vl_train.usage import UsageError
from tests.conftest import REPO, load_model_config
from tests.model.test_auto_classes import WITHOUT_THE_PACKAGE, run_python

TINY_PROCESSOR = REPO / "configs" / "processor" / "tiny.yaml"
QUESTION = [{"type": "image"}, {"type": "text", "text": "What is it?"}]


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    """A tiny model's directory with the processor it was trained with, and a 400x300 image (6 crops at
    the tiny processor's settings, 1 at the released processor's)."""
    torch.manual_seed(0)
    directory = tmp_path_factory.mktemp("export") / "tiny"
    model = Step3VLForConditionalGeneration(load_model_config("tiny")).eval()
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0, 0.3)  # large enough that the reply depends on the image
    model.save_pretrained(directory)
    save_processor(load_processor("tiny", str(TINY_PROCESSOR)), directory)
    image = directory.parent / "image.png"
    pixels = torch.randint(0, 256, (300, 400, 3), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    Image.fromarray(pixels.numpy()).save(image)
    return directory, model, image


REMOTE_GENERATE = (
    WITHOUT_THE_PACKAGE
    + """
import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor
export, image, out = sys.argv[1:]
processor = AutoProcessor.from_pretrained(export, trust_remote_code=True)
model = AutoModelForImageTextToText.from_pretrained(export, trust_remote_code=True).eval()
messages = [{"role": "user", "content": [{"type": "image", "path": image}, {"type": "text", "text": "What is it?"}]}]
inputs = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)
text = processor.apply_chat_template(messages, add_generation_prompt=True)
called = processor(text=text, images=[Image.open(image)])
with torch.no_grad():
    logits = model(**inputs).logits
    tokens = model.generate(**inputs, max_new_tokens=8, do_sample=False)
torch.save({"inputs": dict(inputs), "called": dict(called), "logits": logits, "tokens": tokens}, out)
"""
)


def test_auto_processor_without_the_package_gives_our_inputs_logits_and_tokens(export, tmp_path):
    directory, model, image = export
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"HF_MODULES_CACHE": str(tmp_path / "hf")}
    done = run_python(REMOTE_GENERATE, directory, image, tmp_path / "result.pt", cwd=tmp_path, env=env)
    assert done.returncode == 0, done.stderr[-4000:]
    remote = torch.load(tmp_path / "result.pt")

    processor = load_processor("tiny", str(TINY_PROCESSOR))
    prompt = processor([{"role": "user", "content": QUESTION}], [load_image(image)], add_generation_prompt=True)
    ours = collate([prompt], processor.tokenizer.pad_token_id).model_inputs(with_labels=False)
    with torch.no_grad():
        logits = model(**ours).logits
        tokens = model.generate(**ours, max_new_tokens=8, do_sample=False)
    for inputs in (remote["inputs"], remote["called"]):
        assert inputs["num_patches"].tolist() == ours["num_patches"] == [6]
        for name in ("input_ids", "attention_mask", "pixel_values", "patch_pixel_values"):
            assert torch.equal(inputs[name], ours[name]), name
    assert torch.equal(remote["logits"], logits)
    assert torch.equal(remote["tokens"], tokens) and tokens.shape[1] > ours["input_ids"].shape[1]


def test_an_export_carries_the_settings_it_was_trained_with(export):
    directory = export[0]
    saved = json.loads((directory / "processor_config.json").read_text())
    assert saved["auto_map"] == {"AutoProcessor": "processing_step3.Step3VLHFProcessor"}
    assert saved_settings(directory)["image_size"] == 224 and saved_settings(directory)["crop_size"] == 168
    assert (directory / "chat_template.jinja").read_text() == load_processor("tiny").chat_template
    assert saved_settings(directory.parent) == {}  # no processor there: the released processor's settings


def test_tools_take_the_models_settings_under_the_fields_given(export):
    directory, tiny = export[0], load_model_config("tiny")
    assert model_settings(directory, None, tiny, "chat.processor") == saved_settings(directory)
    merged = model_settings(directory, {"crop_rule": "vllm"}, tiny, "chat.processor")
    assert merged == {**saved_settings(directory), "crop_rule": "vllm"}


def test_settings_the_vision_tower_was_not_built_for_are_refused(export):
    directory, tiny = export[0], load_model_config("tiny")
    released = {"image_size": 728, "crop_size": 504}
    with pytest.raises(UsageError, match=r"chat\.processor: .*image_size=728 .*image_size=224: drop chat\.processor"):
        model_settings(directory, released, tiny, "chat.processor")
    with pytest.raises(UsageError, match=r"image_size=728 .*: set chat\.processor to the processor it was trained"):
        model_settings(directory.parent, None, tiny, "chat.processor")  # settings of its own: the released ones
    assert model_settings(directory.parent, None, load_model_config("step3vl_10b"), "chat.processor") == {}
