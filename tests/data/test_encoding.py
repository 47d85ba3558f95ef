import pytest

from step3vl_train.data.config import PackingConfig
from step3vl_train.data.encoding import SampleEncoder
from step3vl_train.data.schema import build_sample
from step3vl_train.data.skips import SkippedSample
from tests.data.broken_data import jpeg, png


def document(*parts):
    return {"text": [{"type": "image"} if p is None else {"type": "text", "text": p} for p in parts]}


def encode(processor, record, images=(), **packing):
    encoder = SampleEncoder(processor, PackingConfig(**packing))
    return encoder.encode(build_sample("k", record, dict(enumerate(images))), "src")


def test_truncation_never_cuts_an_image(tiny_processor):
    record = document("word " * 20, None, "more " * 40, None, "tail " * 40)
    full = encode(tiny_processor, record, [png(300, 300), png(300, 300)], seq_len=100_000)
    (first, first_end), (second, second_end) = full.layout.image_spans
    for seq_len in (first + 1, first_end - 1, second + 5, second_end + 3):
        cut = encode(tiny_processor, record, [png(300, 300), png(300, 300)], seq_len=seq_len)
        assert cut.truncated and len(cut) <= seq_len
        assert all(end <= len(cut) for _, end in cut.layout.image_spans)
        assert len(cut.images) == len(cut.layout.plans) == len(cut.layout.image_spans)
        assert cut.layout.input_ids == full.layout.input_ids[: len(cut)]
    assert encode(tiny_processor, record, [png(300, 300)] * 2, seq_len=first_end - 1).num_images == 0
    assert encode(tiny_processor, record, [png(300, 300)] * 2, seq_len=second + 5).num_images == 1


def test_overflow_skip_and_nothing_left_to_learn(tiny_processor):
    record = document("word " * 200)
    with pytest.raises(SkippedSample, match="too_long"):
        encode(tiny_processor, record, seq_len=50, overflow="skip")
    assert len(encode(tiny_processor, record, seq_len=50)) == 50
    chat = {"messages": [{"role": "user", "content": "long " * 200}, {"role": "assistant", "content": "ok"}]}
    with pytest.raises(SkippedSample) as caught:
        encode(tiny_processor, chat, seq_len=50)
    assert caught.value.reason == "too_long"


def test_image_budgets(tiny_processor):
    with pytest.raises(SkippedSample) as caught:
        encode(tiny_processor, document(None, None, None), [png()] * 3, max_images_per_pack=2)
    assert caught.value.reason == "too_many_images"
    big = encode(tiny_processor, document(None), [png(1000, 300)], seq_len=100_000)
    with pytest.raises(SkippedSample, match="too_many_images"):
        encode(tiny_processor, document(None), [png(1000, 300)], max_views_per_pack=big.num_views - 1)


def test_corrupt_images_fail_at_the_header_or_at_render(tiny_processor):
    with pytest.raises(SkippedSample, match="corrupt_image"):
        encode(tiny_processor, document(None), [b"GIF89a but not really"])
    cut = encode(tiny_processor, document(None, "cut"), [jpeg()[:1500]])  # the header is intact
    encoder = SampleEncoder(tiny_processor, PackingConfig())
    with pytest.raises(SkippedSample) as caught:
        encoder.render(cut)
    assert caught.value.reason == "corrupt_image" and caught.value.key == "k"
    whole = encoder.render(encode(tiny_processor, document(None, "fine"), [jpeg()]))
    assert len(whole.pixels.sources) == 1
