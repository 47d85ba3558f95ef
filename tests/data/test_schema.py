import json

import pytest

from step3vl_train.data.schema import build_sample, count_image_parts, decode_record
from step3vl_train.data.skips import SkippedSample


def reason(record, images=None):
    with pytest.raises(SkippedSample) as caught:
        build_sample("k", record, images or {})
    return caught.value.reason


def test_conversation_with_images_in_part_order():
    record = {
        "messages": [
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "and"}, {"type": "image"}]},
            {"role": "assistant", "content": "two", "reasoning_content": "I see two."},
        ],
        "source": "s",
        "answer": "2",
        "reward": "math",
    }
    sample = build_sample("k", record, {1: b"second", 0: b"first"})
    assert sample.images == [b"first", b"second"]
    assert (sample.source, sample.answer, sample.reward, sample.num_image_parts) == ("s", "2", "math", 2)


def test_document_forms():
    assert build_sample("k", {"text": "plain"}, {}).num_image_parts == 0
    interleaved = {"text": [{"type": "text", "text": "a"}, {"type": "image"}]}
    assert build_sample("k", interleaved, {0: b"x"}).images == [b"x"]
    assert count_image_parts([{"content": [{"type": "image"}]}, {"content": "text"}]) == 1


@pytest.mark.parametrize(
    ("record", "images", "expected"),
    [
        ({"text": "a", "messages": []}, {}, "bad_schema"),
        ({"neither": 1}, {}, "bad_schema"),
        ({"text": "a", "colour": "red"}, {}, "bad_schema"),
        ({"messages": [{"role": "robot", "content": "hi"}]}, {}, "bad_schema"),
        ({"messages": [{"role": "user", "content": [{"type": "video"}]}]}, {}, "bad_schema"),
        ({"text": [{"type": "image"}, {"type": "image"}]}, {0: b"x"}, "missing_image"),
        ({"text": [{"type": "image"}]}, {0: b"x", 1: b"y"}, "placeholder_mismatch"),
        ({"text": "no images"}, {0: b"x"}, "placeholder_mismatch"),
    ],
)
def test_schema_violations_name_their_reason(record, images, expected):
    assert reason(record, images) == expected


def test_malformed_json():
    for raw in (b"{not json", b"[1, 2]", b"\xff\xfe"):
        with pytest.raises(SkippedSample) as caught:
            decode_record("k", raw)
        assert caught.value.reason == "malformed_json" and caught.value.key == "k"
    assert decode_record("k", json.dumps({"text": "a"}).encode()) == {"text": "a"}


def test_unknown_reason_is_a_bug():
    with pytest.raises(ValueError, match="unknown skip reason"):
        SkippedSample("bad_luck", "k", "")
