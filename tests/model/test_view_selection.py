"""The vision tower in chunks of views, and only on the views a sequence slice needs."""

import pytest
import torch
from PIL import Image

from step3vl_train.model import ImageTokenMismatchError
from step3vl_train.model.view_selection import ViewSelection

GLOBAL, CROP = 16, 9  # tiny tokens per global view (224 px) and crop (168 px)


def views(seed=0, num_patches=(2, 0, 3)):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(len(num_patches), 3, 224, 224, generator=g),
        torch.randn(sum(num_patches), 3, 168, 168, generator=g),
        list(num_patches),
    )


def tokens_per_view(side):
    return (side // 56) ** 2


def test_a_token_range_selects_the_run_of_views_holding_it():
    globals_, crops, num_patches = views()
    # Placeholder order: crop0 crop1 global0 | global1 | crop2 crop3 crop4 global2
    selection = ViewSelection.of(globals_, crops, num_patches, tokens_per_view, (2 * CROP + 3, 2 * CROP + GLOBAL + 5))
    assert selection.pieces == [(True, 0), (True, 1)] and selection.offset == 3
    selection = ViewSelection.of(globals_, crops, num_patches, tokens_per_view, (CROP + 1, 2 * CROP + 2 * GLOBAL + 1))
    assert selection.globals == range(0, 2) and selection.crops == range(1, 3)
    assert ViewSelection.of(globals_, crops, num_patches, tokens_per_view, (4, 4)).pieces == []
    with pytest.raises(ImageTokenMismatchError, match="num_patches"):
        ViewSelection.of(globals_, crops, [2, 0, 2], tokens_per_view)
    with pytest.raises(ImageTokenMismatchError, match="no pixel_values"):
        ViewSelection.of(None, None, None, tokens_per_view, (0, 3))


@pytest.mark.parametrize("start,end", [(0, 3 * GLOBAL + 5 * CROP), (5, 40), (2 * CROP, 2 * CROP + GLOBAL), (60, 93)])
def test_a_slice_of_image_tokens_equals_that_slice_of_all_of_them(tiny_model, start, end):
    globals_, crops, num_patches = views()
    with torch.no_grad():
        every, _ = tiny_model.image_embeddings(globals_, crops, num_patches)
        part, _ = tiny_model.image_embeddings(globals_, crops, num_patches, (start, end))
    torch.testing.assert_close(part, every[start:end], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mode,tower_runs", [("blocks", 8), ("calls", 2 * 8)])
def test_chunked_checkpointed_tower_gives_the_same_tokens_and_gradients(tiny_model, mode, tower_runs):
    """One call over every view against one view a call, checkpointed either way: same outputs, same
    gradients. With `calls` each call runs again in backward; with `blocks` only its blocks do."""
    globals_, crops, num_patches = views(1)
    upstream = torch.randn(3 * GLOBAL + 5 * CROP, tiny_model.config.hidden_size)
    tiny_model.train()
    tiny_model.runtime.compute.vision_chunk = 0
    whole, _ = tiny_model.image_embeddings(globals_, crops, num_patches)
    (whole * upstream).sum().backward()
    expected = {name: p.grad.clone() for name, p in tiny_model.named_parameters() if p.grad is not None}
    tiny_model.zero_grad()
    tiny_model.gradient_checkpointing_enable()
    tiny_model.runtime.compute.vision_chunk = 1
    tiny_model.runtime.compute.vision_checkpoint = mode
    calls = []
    tiny_model.vision_model.register_forward_hook(lambda *_: calls.append(1))
    chunked, _ = tiny_model.image_embeddings(globals_, crops, num_patches)
    (chunked * upstream).sum().backward()
    torch.testing.assert_close(chunked, whole, rtol=1e-5, atol=1e-6)
    assert set(expected) == {n for n, p in tiny_model.named_parameters() if p.grad is not None}
    for name, grad in expected.items():
        torch.testing.assert_close(dict(tiny_model.named_parameters())[name].grad, grad, rtol=1e-4, atol=1e-5)
    assert len(calls) == tower_runs  # 8 views, one a call


def test_a_rank_calls_the_tower_as_its_own_views_need_and_once_on_a_stand_in_without_any(tiny_model):
    """The weights are kept whole under ZeRO-3, so a call gathers nothing and a rank makes the calls its
    own views need; a rank without a view calls once on a stand-in when another rank runs the tower, so
    that its backward reaches the same weights (the gradient reduce needs them on every rank)."""
    globals_, crops, num_patches = views(2, (1,))
    calls = []
    tiny_model.vision_model.register_forward_hook(lambda _m, args, _o: calls.append(tuple(args[0].shape)))
    tiny_model.runtime.compute.vision_chunk = 1
    with torch.no_grad():
        tokens, zero = tiny_model.image_embeddings(globals_, crops, num_patches, stand_in=True)
        assert calls == [(1, 3, 224, 224), (1, 3, 168, 168)] and tokens.shape[0] == GLOBAL + CROP
        calls.clear()
        tokens, zero = tiny_model.image_embeddings(None, None, None, stand_in=True)
    assert calls == [(1, 3, 56, 56)] and tokens is None and float(zero) == 0.0


def test_stand_ins_are_made_where_the_model_is(tiny_model):
    """A text-only batch has no pixels to take a device from: the stand-ins go where the model is (the
    meta device standing in for a GPU), or a GPU run would feed the tower CPU tensors."""
    tiny_model.to("meta")
    tokens, zero = tiny_model.image_embeddings(None, None, None, stand_in=True)
    assert tokens is None and zero.device.type == "meta"


def test_a_sequence_slice_holding_only_crop_tokens_runs_only_those_crops(tiny_model, monkeypatch):
    """The first of two sequence-parallel ranks holds the first half of a 64-token row that opens with an
    image of 4 crops (36 tokens, then 16 of the global view): only crops reach its tower, and the slice is
    no error for lacking a global view."""
    runtime = type(tiny_model.runtime)
    monkeypatch.setattr(runtime, "sequence_parallel", property(lambda self: 2))
    monkeypatch.setattr(runtime, "sequence_rank", property(lambda self: 0))
    globals_, crops, num_patches = views(3, (4,))
    ids = torch.randint(11, 1000, (1, 64))
    ids[0, : 4 * CROP + GLOBAL] = 5
    sides = []
    tiny_model.vision_model.register_forward_hook(lambda _m, args, _o: sides.append(args[0].shape[-1]))
    tiny_model.train()
    tiny_model(
        input_ids=ids, position_ids=torch.arange(64)[None], pixel_values=globals_, patch_pixel_values=crops,
        num_patches=num_patches, labels=ids,
    )  # fmt: skip
    assert 168 in sides and 224 not in sides  # crops (168 px), and no global view (224) nor a stand-in for one


@pytest.mark.parametrize("rank", [0, 1])
def test_a_sequence_slice_given_only_its_views_computes_what_it_does_given_all(tiny_model, monkeypatch, rank):
    """train/sequence_parallel.py hands each rank of a group only the views its slice needs, starting at
    `view_offset`: the rank's loss and the tower's calls are those it makes with every view of the row."""
    from step3vl_train.data.packing import Pack, collate_packs
    from step3vl_train.data.stats import DataStats
    from step3vl_train.processing.processor import load_processor
    from step3vl_train.train.sequence_parallel import slice_views
    from tests.conftest import REPO

    runtime = type(tiny_model.runtime)
    monkeypatch.setattr(runtime, "sequence_parallel", property(lambda self: 2))
    monkeypatch.setattr(runtime, "sequence_rank", property(lambda self: rank))
    processor = load_processor("tiny", str(REPO / "configs/processor/tiny.yaml"))
    photo = Image.open(REPO / "data/samples/chelsea.png").convert("RGB")
    samples = []
    for i, size in enumerate([(400, 300), (150, 150), (500, 200)]):
        content = [{"type": "image"}, {"type": "text", "text": "word " * (3 + i)}]
        answer = {"role": "assistant", "content": "answer " * (2 + i)}
        samples.append(processor([{"role": "user", "content": content}, answer], [photo.resize(size)]))
    row = collate_packs([Pack(samples, ["a", "b", "c"], 0, DataStats())], 0).batch
    part = slice_views(row, rank, 2, tiny_model.config.image_token_id, tiny_model.tokens_per_view)
    assert len(part.pixels.sources) + part.pixels.num_crops < len(row.pixels.sources) + row.pixels.num_crops
    tiny_model.train()
    losses, sides = [], []
    tiny_model.vision_model.register_forward_hook(lambda _m, args, _o: sides.append(tuple(args[0].shape)))
    for batch in (row, part):
        with torch.no_grad():
            losses.append(tiny_model(**batch.model_inputs(), num_items_in_batch=1).loss)
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-6, atol=1e-6)
    assert sides[: len(sides) // 2] == sides[len(sides) // 2 :]
