import numpy as np
import pytest

from step3vl_train.data.config import PackingConfig
from step3vl_train.data.encoding import SampleEncoder
from step3vl_train.data.schema import build_sample
from step3vl_train.data.shards import encode_image
from step3vl_train.data.synthetic import COLORS, TASKS, draw_shapes, make_sample
from step3vl_train.data.synthetic.tasks import CHOICE_COLORS


@pytest.mark.parametrize("kind", sorted(TASKS))
def test_every_task_is_a_valid_sample(kind, tiny_processor):
    encoder = SampleEncoder(tiny_processor, PackingConfig(seq_len=1 << 20))
    for index in range(2 * len(TASKS[kind])):
        task, sample = make_sample(kind, index, seed=0)
        images = {i: encode_image(image, sample.image_format) for i, image in enumerate(sample.images)}
        parsed = build_sample(f"{task}-{index}", sample.record, images)
        encoded = encoder.encode(parsed, task)
        assert any(encoded.layout.loss_mask) or kind == "rl"
        assert parsed.source == f"synthetic/{kind}/{task}"
        if kind == "rl":
            assert parsed.answer is not None and parsed.reward in ("math", "grounding", "pointing", "choice")
        if kind == "sft":
            assert parsed.messages[-1]["reasoning_content"]


def test_same_seed_same_sample_other_seed_other_sample():
    _, a = make_sample("pretrain", 3, seed=1)
    _, b = make_sample("pretrain", 3, seed=1)
    _, c = make_sample("pretrain", 3, seed=2)
    assert a.record == b.record and np.array_equal(np.asarray(a.images[0]), np.asarray(b.images[0]))
    assert a.record != c.record


def test_boxes_hold_the_shapes_they_name():
    image, shapes = draw_shapes(np.random.default_rng(5), 4)
    pixels = np.asarray(image)
    assert shapes
    for shape in shapes:
        x, y = shape.center
        assert tuple(pixels[y, x]) == COLORS[shape.color]
        x0, y0, x1, y1 = shape.box
        assert 0 <= x0 < x1 <= image.width and 0 <= y0 < y1 <= image.height


@pytest.mark.parametrize("kind", ["sft", "rl"])
def test_a_choice_answer_names_the_colour_drawn(kind):
    """The option letter (and the SFT reasoning) names the one colour of CHOICE_COLORS the image shows."""
    tasks = list(TASKS[kind])
    letters = []
    for turn in range(8):
        task, sample = make_sample(kind, tasks.index("choice") + turn * len(tasks), seed=0)
        pixels = np.asarray(sample.images[0]).reshape(-1, 3)
        shown = [name for name in CHOICE_COLORS if (pixels == COLORS[name]).all(axis=1).sum() > 100]
        assert task == "choice" and len(shown) == 1
        letter = sample.record["answer"] if kind == "rl" else sample.record["messages"][-1]["content"]
        assert letter == "ABCD"[CHOICE_COLORS.index(shown[0])]
        assert f"({letter}) {shown[0]}" in sample.record["messages"][0]["content"][1]["text"]
        if kind == "sft":
            assert shown[0] in sample.record["messages"][-1]["reasoning_content"]
        letters.append(letter)
    assert len(set(letters)) > 1
