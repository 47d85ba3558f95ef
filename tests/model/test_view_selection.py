"""The vision tower in chunks of views, and only on the views a sequence slice needs."""

import pytest
import torch

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


def test_chunked_checkpointed_tower_gives_the_same_tokens_and_gradients(tiny_model):
    """One call over every view against one view a call, each checkpointed, with block checkpointing
    inside: same outputs, same gradients."""
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
    calls = []
    tiny_model.vision_model.register_forward_hook(lambda *_: calls.append(1))
    chunked, _ = tiny_model.image_embeddings(globals_, crops, num_patches)
    (chunked * upstream).sum().backward()
    torch.testing.assert_close(chunked, whole, rtol=1e-5, atol=1e-6)
    assert set(expected) == {n for n, p in tiny_model.named_parameters() if p.grad is not None}
    for name, grad in expected.items():
        torch.testing.assert_close(dict(tiny_model.named_parameters())[name].grad, grad, rtol=1e-4, atol=1e-5)
    assert len(calls) == 2 * 8  # 8 views, one a call, each run again in backward


def test_a_rank_with_fewer_views_makes_as_many_tower_calls(tiny_model):
    """Stand-ins fill the calls this rank's views do not need, so ZeRO-3's gathers stay in step."""
    globals_, crops, num_patches = views(2, (1,))
    calls = []
    tiny_model.vision_model.register_forward_hook(lambda _m, args, _o: calls.append(args[0].shape[0]))
    tiny_model.runtime.compute.vision_chunk = 1
    with torch.no_grad():
        tokens, zero = tiny_model.image_embeddings(globals_, crops, num_patches, chunks=(3, 2))
    assert calls == [1, 1, 1, 1, 1] and tokens.shape[0] == GLOBAL + CROP and float(zero) == 0.0


def test_stand_ins_are_made_where_the_model_is(tiny_model):
    """A text-only batch has no pixels to take a device from: the stand-ins go where the model is (the
    meta device standing in for a GPU), or a GPU run would feed the tower CPU tensors."""
    tiny_model.to("meta")
    tokens, zero = tiny_model.image_embeddings(None, None, None, chunks=(1, 1))
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
