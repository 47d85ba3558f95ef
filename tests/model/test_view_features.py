"""The frozen tower's features handed to the model in place of pixels (step3vl_train/model/view_features.py):
the same log-probs, loss and gradients as from the pixels, with no tower call; and, as under ZeRO-3, stand-in
calls where another rank needs the tower or the projector."""

import pytest
import torch

from step3vl_train.model.view_features import ViewFeatures
from tests.model.test_view_selection import CROP, GLOBAL, views


def image_batch(seed=0):
    """Two rows over the 3 images of `views` (2 crops, none, 3 crops): row 0 holds images 0 and 1, row 1
    image 2, their <im_patch> tokens (id 5) between text tokens."""
    globals_, crops, num_patches = views(seed)
    g = torch.Generator().manual_seed(seed + 1)
    rows = [2 * CROP + 2 * GLOBAL, 3 * CROP + GLOBAL]
    input_ids = torch.randint(11, 1000, (2, 60), generator=g)
    for row, count in enumerate(rows):
        input_ids[row, 4 : 4 + count] = 5
    labels = input_ids.clone()
    labels[:, :8] = -100
    return {
        "input_ids": input_ids,
        "pixel_values": globals_,
        "patch_pixel_values": crops,
        "num_patches": num_patches,
    }, labels


def counted_calls(module):
    """The batch size of each call of `module`, from now on."""
    calls = []
    module.register_forward_hook(lambda _m, args, _o: calls.append(len(args[0])))
    return calls


def run(model, inputs, labels):
    """Log-probs without gradients, then the loss and every parameter's gradient."""
    model.zero_grad()
    with torch.no_grad():
        logprobs = model(**inputs, labels=labels, logprobs_temperature=1.0).logprobs
    loss = model(**inputs, labels=labels).loss
    loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return logprobs, loss.detach(), grads


def assert_same(got, expected):
    (logprobs, loss, grads), (ref_logprobs, ref_loss, ref_grads) = got, expected
    torch.testing.assert_close(logprobs, ref_logprobs, rtol=0, atol=1e-6)
    torch.testing.assert_close(loss, ref_loss, rtol=0, atol=1e-6)
    assert grads.keys() == ref_grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(grad, ref_grads[name], rtol=1e-5, atol=1e-6, msg=name)


def frozen_tower(model):
    model.train()
    for param in model.vision_model.parameters():
        param.requires_grad_(False)
    return model


def test_given_features_give_the_pixels_results_and_call_no_tower(tiny_model):
    model = frozen_tower(tiny_model)
    inputs, labels = image_batch()
    tower = counted_calls(model.vision_model)
    expected = run(model, inputs, labels)
    assert tower  # the pixels went through the tower
    features = model.precompute_view_features(
        inputs["pixel_values"], inputs["patch_pixel_values"], inputs["num_patches"]
    )
    assert features.globals.shape == (3, GLOBAL, 4 * 64) and features.crops.shape == (5, CROP, 4 * 64)
    tower.clear()
    given = {**inputs, "pixel_values": None, "patch_pixel_values": None, "image_features": features}
    got = run(model, given, labels)
    assert tower == []
    assert_same(got, expected)
    assert got[2]["vit_large_projector.weight"].abs().sum() > 0  # the projector still learns
    # per sample and back, as the RL cache keeps and assembles them
    parts = features.split([2, 1], [2, 3])
    assert [p.crops.shape[0] for p in parts] == [2, 3]
    assert torch.equal(ViewFeatures.cat(parts).globals, features.globals)


@pytest.mark.parametrize("given", [True, False])
def test_a_rank_joins_the_image_path_another_rank_runs(tiny_model, given):
    """Gradients are reduced in buckets that must hold the same parameters on every rank: a rank with
    features still calls the tower once (a stand-in) where another rank runs it on pixels, and a rank
    with pixels calls the projector once more where another rank projects given features. Each rank
    otherwise calls the tower as its own views need: the weights are kept whole, a call gathers nothing."""
    model = frozen_tower(tiny_model)
    inputs, labels = image_batch()
    expected = run(model, inputs, labels)
    if given:
        features = model.precompute_view_features(inputs["pixel_values"], inputs["patch_pixel_values"], [2, 0, 3])
        inputs = {**inputs, "pixel_values": None, "patch_pixel_values": None, "image_features": features}
    model.runtime.agree = lambda counts, device: [1, 1]  # another rank runs the tower and projects features
    tower, projector = counted_calls(model.vision_model), counted_calls(model.vit_large_projector)
    model(**inputs, labels=labels)  # with gradients: without, there is no reduce to join
    if given:  # one stand-in of one 56-pixel view, then one projection of all 93 tokens
        assert tower == [1] and projector == [1, 3 * GLOBAL + 5 * CROP]
    else:  # the tower in one call a kind (3 globals, then 5 crops), a projector stand-in after
        assert tower == [3, 5] and projector == [3, 5, 1]
    assert_same(run(model, inputs, labels), expected)


def test_precomputing_features_is_no_collective(tiny_model):
    """Without gradients there is no reduce to join: a rank with no views calls nothing."""
    model = frozen_tower(tiny_model)
    model.runtime.agree = lambda counts, device: pytest.fail("precompute_view_features agreed with other ranks")
    tower = counted_calls(model.vision_model)
    features = model.precompute_view_features(None, None, [])
    assert features == ViewFeatures(None, None) and tower == []
