import hashlib
import re

import numpy as np
import pytest

from step3vl_train.data.config import PackingConfig
from step3vl_train.data.encoding import SampleEncoder
from step3vl_train.data.schema import build_sample
from step3vl_train.data.shards import encode_image
from step3vl_train.data.skips import SkippedSample
from step3vl_train.data.sources import read_tar_shard
from step3vl_train.data.synthetic import COLORS, SHAPES, TASKS, draw_shapes, make_sample, write_corpus
from step3vl_train.data.synthetic.tasks import CHOICE_COLORS, OPEN_QUESTIONS


@pytest.mark.parametrize("kind", sorted(TASKS))
def test_every_task_is_a_valid_sample(kind, tiny_processor):
    encoder = SampleEncoder(tiny_processor, PackingConfig(seq_len=1 << 20))
    for index in range(2 * len(TASKS[kind])):
        task, sample = make_sample(kind, index, seed=0)
        images = {i: encode_image(image, sample.image_format) for i, image in enumerate(sample.images)}
        parsed = build_sample(f"{task}-{index}", sample.record, images)
        encoded = encoder.encode(parsed, task)
        assert any(encoded.layout.loss_mask) == (kind in ("pretrain", "sft"))  # prompts only: nothing to learn
        assert parsed.source == f"synthetic/{kind}/{task}"
        if kind == "rl":
            assert parsed.answer is not None and parsed.reward in ("math", "grounding", "pointing", "choice")
        if kind == "sft":
            assert parsed.messages[-1]["reasoning_content"]
        if kind in ("rlhf", "preference"):
            assert parsed.messages[-1]["role"] == "user" and parsed.answer is None
        assert (parsed.reference is not None) == (parsed.reward == "reward_model") == (kind == "rlhf")
        assert (parsed.chosen is not None) == (parsed.rejected is not None) == (kind == "preference")


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


def shown_shape(sample):
    """The one colour of CHOICE_COLORS the sample's image shows, read from its pixels."""
    pixels = np.asarray(sample.images[0]).reshape(-1, 3)
    (color,) = [name for name in CHOICE_COLORS if (pixels == COLORS[name]).all(axis=1).sum() > 100]
    return color


def words(text):
    return set(re.findall(r"[a-z]+", text.lower()))


@pytest.mark.parametrize(("kind", "task"), [("rlhf", "open"), ("preference", "pairs")])
def test_rlhf_kinds_write_shards_the_readers_accept(kind, task, tmp_path, tiny_processor):
    def count_tokens(record, images):
        return len(tiny_processor.layout(record["messages"], [image.size for image in images]))

    manifests = write_corpus(kind, str(tmp_path), num=12, seed=0, shard_size=5, count_tokens=count_tokens)
    assert list(manifests) == [task] and manifests[task]["samples"] == 12 and manifests[task]["tokens"] > 0
    assert [shard["samples"] for shard in manifests[task]["shards"]] == [5, 5, 2]
    samples = [item for path in sorted((tmp_path / task).glob("*.tar")) for item, _, _ in read_tar_shard(str(path))]
    assert len(samples) == 12 and all(not isinstance(s, SkippedSample) for s in samples)
    for sample in samples:
        assert len(sample.images) == 1 and sample.messages[0]["content"][1]["text"] in OPEN_QUESTIONS
        assert sample.source == f"synthetic/{kind}/{task}"
        if kind == "rlhf":
            assert sample.reward == "reward_model" and sample.reference and sample.chosen is None
        else:
            assert sample.chosen and sample.rejected and sample.reward is None and sample.reference is None


def test_a_reference_names_the_shape_drawn():
    kinds = set()
    for index in range(12):
        _, sample = make_sample("rlhf", index, seed=0)
        reference = words(sample.record["reference"])
        assert reference & set(COLORS) == {shown_shape(sample)}
        assert len(reference & set(SHAPES)) == 1
        kinds |= reference & set(SHAPES)
    assert len(kinds) > 1


def test_a_chosen_reply_names_a_colour_and_a_rejected_one_none():
    """Naming the colour is the one property that always separates the pair; digits, the shape's kind
    and the length do not."""
    pairs = [make_sample("preference", index, seed=0)[1] for index in range(64)]
    for sample in pairs:
        chosen, rejected = sample.record["chosen"], sample.record["rejected"]
        assert chosen != rejected
        assert words(chosen) & set(COLORS) == {shown_shape(sample)}
        assert not any(color in rejected.lower() for color in COLORS)  # not even inside another word
        assert re.search(r"\d", rejected) or re.fullmatch(r"[ABCD]\.?", rejected)
    chosen = [s.record["chosen"] for s in pairs]
    rejected = [s.record["rejected"] for s in pairs]
    assert any(re.search(r"\d", text) for text in chosen)
    assert any(words(text) & set(SHAPES) for text in rejected) and not all(words(text) & set(SHAPES) for text in chosen)
    assert min(map(len, rejected)) < max(map(len, chosen)) and min(map(len, chosen)) < max(map(len, rejected))
    assert len(set(chosen)) > 8 and len(set(rejected)) > 8


@pytest.mark.parametrize("kind", ["rlhf", "preference"])
def test_another_seed_is_a_disjoint_held_out_split(kind):
    def split(seed):
        samples = [make_sample(kind, index, seed)[1] for index in range(40)]
        return {hashlib.sha256(np.asarray(s.images[0]).tobytes()).hexdigest() for s in samples}, samples

    train, samples = split(0)
    again, same = split(0)
    held_out, other = split(1)
    assert train == again and [s.record for s in samples] == [s.record for s in same]
    assert len(train) == len(held_out) == 40 and not train & held_out
    assert [s.record for s in samples] != [s.record for s in other]
