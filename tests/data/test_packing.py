import pytest
import torch
from PIL import Image
from torch.utils.data._utils.pin_memory import pin_memory

from step3vl_train.data.config import PackingConfig
from step3vl_train.data.packing import Pack, collate_packs, plan_packs
from step3vl_train.data.stats import DataStats
from step3vl_train.processing.processor import IGNORE_INDEX, collate


def test_best_fit_respects_every_budget():
    cfg = PackingConfig(seq_len=100, max_images_per_pack=2, max_views_per_pack=5)
    lengths = [60, 50, 40, 30, 20, 10, 90, 5]
    images = [0, 1, 1, 1, 0, 0, 0, 1]
    views = [0, 3, 3, 1, 0, 0, 0, 1]
    packs = plan_packs(lengths, images, views, cfg)
    assert sorted(i for pack in packs for i in pack) == list(range(len(lengths)))
    for pack in packs:
        assert sum(lengths[i] for i in pack) <= 100
        assert sum(images[i] for i in pack) <= 2 and sum(views[i] for i in pack) <= 5
        assert pack == sorted(pack)
    assert len(packs) == 4  # 305 tokens need at least 4 packs of 100


def test_best_fit_is_tight_on_many_small_samples():
    cfg = PackingConfig(seq_len=4096)
    gen = torch.Generator().manual_seed(0)
    lengths = torch.randint(20, 1500, (500,), generator=gen).tolist()
    packs = plan_packs(lengths, [0] * 500, [0] * 500, cfg)
    assert sum(lengths) / (len(packs) * 4096) > 0.98


def image(width, height, seed):
    torch.manual_seed(seed)
    pixels = (torch.rand(height, width, 3) * 255).to(torch.uint8).numpy()
    return Image.fromarray(pixels)


@pytest.fixture
def samples(tiny_processor):
    chat = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]},
        {"role": "assistant", "content": "A pattern.", "reasoning_content": "Noise."},
    ]
    doc = [{"type": "text", "text": "Two views"}, {"type": "image"}, {"type": "text", "text": "end."}]
    first = tiny_processor(chat, [image(300, 200, 0)])
    layout = tiny_processor.layout(None, [(180, 400)], document=doc)
    second = tiny_processor.render(layout, [image(180, 400, 1)])
    third = tiny_processor([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello there."}])
    return [first, second, third]


def test_collate_restarts_positions_and_cuts_targets_at_boundaries(samples):
    packed = collate_packs([Pack(samples, ["a", "b", "c"], 0, DataStats())], pad_token_id=0)
    batch = packed.batch
    lengths = [len(s.input_ids) for s in samples]
    starts = [0, lengths[0], lengths[0] + lengths[1]]
    assert batch.input_ids.shape == (1, sum(lengths))
    expected_positions = torch.cat([torch.arange(n) for n in lengths])
    assert torch.equal(batch.position_ids[0], expected_positions)
    for start, sample in zip(starts, samples, strict=True):
        assert batch.labels[0, start] == IGNORE_INDEX
        n = len(sample.input_ids)
        assert torch.equal(batch.labels[0, start + 1 : start + n], sample.labels[1:])
    assert batch.num_patches == samples[0].num_patches + samples[1].num_patches
    assert packed.keys == [["a", "b", "c"]]
    assert batch.model_inputs()["attention_mask"] is None


def test_a_pack_carries_its_pixels_in_one_buffer(samples, monkeypatch):
    packed = collate_packs([Pack(samples, ["a", "b", "c"], 0, DataStats())], pad_token_id=0).batch
    first, second = samples[0].pixels, samples[1].pixels
    assert torch.equal(packed.pixels.data, torch.cat([first.data, second.data]))
    shift = first.data.numel()
    assert packed.pixels.sources == first.sources + [(shift + o, h, w) for o, h, w in second.sources]
    inputs = packed.model_inputs()
    for key in ("pixel_values", "patch_pixel_values"):
        alone = [collate([s], 0).model_inputs()[key] for s in samples[:2]]
        assert torch.equal(inputs[key], torch.cat(alone)), key
    # Inside a DataLoader worker the buffer is made in shared memory, so it leaves without another copy.
    monkeypatch.setattr("step3vl_train.processing.pixels.get_worker_info", lambda: object())
    in_worker = collate_packs([Pack(samples, ["a", "b", "c"], 0, DataStats())], pad_token_id=0).batch
    assert in_worker.pixels.data.is_shared() and not packed.pixels.data.is_shared()
    assert torch.equal(in_worker.pixels.data, packed.pixels.data)


def test_pin_memory_reaches_every_tensor_of_a_packed_batch(samples, monkeypatch):
    """What the loader's pin-memory thread does with a worker's (batch, worker id, state) result. Pinning needs
    an accelerator, so the tensors' own pin_memory is stood in for here (the real one runs where CUDA is)."""
    pinned = []

    def pin(tensor):
        pinned.append(tensor.clone())
        return pinned[-1]

    monkeypatch.setattr(torch.Tensor, "pin_memory", pin)
    packed = collate_packs([Pack(samples, ["a", "b", "c"], 0, DataStats())], pad_token_id=0)
    out = pin_memory((packed, 0, {}))[0]
    batch = out.batch
    fields = [batch.input_ids, batch.attention_mask, batch.labels, batch.position_ids, batch.pixels.data]
    assert len(pinned) == len(fields) and all(any(t is p for p in pinned) for t in fields)
    assert out.keys == packed.keys and batch.pixels.sources == packed.batch.pixels.sources


@pytest.mark.skipif(not torch.cuda.is_available(), reason="pinning needs CUDA")
def test_pinned_batch_is_page_locked(samples):
    batch = collate_packs([Pack(samples, ["a", "b", "c"], 0, DataStats())], pad_token_id=0).pin_memory().batch
    assert batch.input_ids.is_pinned() and batch.pixels.data.is_pinned()
    inputs = batch.model_inputs(device="cuda")
    assert inputs["pixel_values"].is_cuda and inputs["patch_pixel_values"].is_cuda


def test_packed_samples_do_not_see_each_other(tiny_model, samples):
    """Logits and summed loss of a pack equal those of the samples run one by one."""
    packed = collate_packs(
        [Pack(samples[:2], ["a", "b"], 0, DataStats()), Pack(samples[2:], ["c"], 0, DataStats())], pad_token_id=0
    ).batch
    with torch.no_grad():
        logits = tiny_model(**packed.model_inputs(with_labels=False)).logits
        at = 0
        for sample in samples[:2]:
            alone = tiny_model(**collate([sample], pad_token_id=0).model_inputs(with_labels=False)).logits[0]
            n = len(sample.input_ids)
            torch.testing.assert_close(logits[0, at : at + n], alone, rtol=1e-5, atol=1e-5)
            at += n
        alone = tiny_model(**collate(samples[2:], pad_token_id=0).model_inputs(with_labels=False)).logits[0]
        torch.testing.assert_close(logits[1, : len(samples[2].input_ids)], alone, rtol=1e-5, atol=1e-5)
        summed = tiny_model(**packed.model_inputs(), num_items_in_batch=1).loss
        separate = sum(tiny_model(**collate([s], 0).model_inputs(), num_items_in_batch=1).loss for s in samples)
    torch.testing.assert_close(summed, separate, rtol=1e-5, atol=1e-5)


def test_empty_packs_carry_counts_only():
    stats = DataStats(samples=3)
    packed = collate_packs([Pack([], [], 1, stats)], pad_token_id=0)
    assert packed.batch is None and packed.stats.samples == 3 and packed.worker == 1
