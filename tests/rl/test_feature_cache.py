"""The frozen tower's features of an iteration's image prompts (rl/feature_cache.py): each prompt encoded
once, its rows given its features, a cap beyond which the forwards run the tower, and refusals where the
tower trains. The 2-rank TrainWorker part (tests/rl/feature_cache_run.py) counts the tower's calls in an
iteration and holds the cached and uncached paths, and the on-policy update without its scoring pass, to
the same numbers."""

from pathlib import Path

import pytest
import torch

from rl.config import RLConfig
from rl.experience import Completion, Response, sequence_batch
from rl.feature_cache import ImageFeatureCache, same_tower
from step3vl_train.model import Step3VLForConditionalGeneration
from tests.conftest import load_model_config
from tests.model.test_view_features import counted_calls, frozen_tower
from tests.rl.ranks import run_ranks
from tests.rl.test_engines import image_prompt, text_prompt

REPO = Path(__file__).resolve().parents[2]
SIZES = [(200, 150), (400, 300), (224, 224)]  # a global view alone, 6 crops, a global view alone
KIB_PER_TOKEN = 4 * 64 * 4 / 1024  # 4 x vision width 64, float32


def iteration_responses(processor, n=4):
    """`n` responses to each of 3 image prompts and a text prompt, grouped as the driver groups them."""
    prompts = [image_prompt(processor, size, text=f"Image {i}?") for i, size in enumerate(SIZES)]
    prompts.append(text_prompt(processor))
    for i, prompt in enumerate(prompts):
        prompt.key = f"shard.tar:{i}"
    return [
        Response(group, prompt, Completion([11 + k, 12, 13], [-1.0] * 3, "stop"))
        for group, prompt in enumerate(prompts)
        for k in range(n)
    ]


def test_each_prompt_is_encoded_once_and_its_rows_get_its_features(tiny_model, tiny_processor):
    model = frozen_tower(tiny_model)
    responses = iteration_responses(tiny_processor)
    cache = ImageFeatureCache(model, 1, "policy")
    tower = counted_calls(model.vision_model)
    cache.fill(responses, torch.device("cpu"), torch.float32)
    assert tower == [3, 6]  # the 3 global views in one call, the 6 crops in another: each view once
    cache.fill(responses, torch.device("cpu"), torch.float32)
    assert tower == [3, 6]  # nothing new to encode (the rank still joins the calls of others: none here)
    assert cache.stats() == {
        "image_cache/prompts": 3,
        "image_cache/over_cap": 0,
        "image_cache/mib": (16 + 16 + 70) * KIB_PER_TOKEN / 1024,
    }
    rows = [responses[5], responses[12], responses[0], responses[9], responses[4]]  # prompts 1, text, 0, 2, 1
    batch = sequence_batch([(r.prompt.sample, r.completion.token_ids) for r in rows], 0).batch
    inputs = batch.model_inputs(with_labels=False)
    expected = model.precompute_view_features(inputs["pixel_values"], inputs["patch_pixel_values"], batch.num_patches)
    got = cache.batch(rows)
    torch.testing.assert_close(got.globals, expected.globals, rtol=0, atol=1e-6)
    torch.testing.assert_close(got.crops, expected.crops, rtol=0, atol=1e-6)
    assert cache.batch(responses[12:]) is None  # text alone: no features
    cache.reset()
    assert cache.stats()["image_cache/prompts"] == 0


def test_prompts_over_the_cap_are_counted_and_their_rows_run_the_tower(tiny_model, tiny_processor):
    model = frozen_tower(tiny_model)
    responses = iteration_responses(tiny_processor)
    cache = ImageFeatureCache(model, 40 * KIB_PER_TOKEN / 1024, "policy")  # 40 tokens: not prompt 1's 70
    cache.fill(responses, torch.device("cpu"), torch.float32)
    assert cache.stats()["image_cache/prompts"] == 2 and cache.stats()["image_cache/over_cap"] == 1
    assert cache.batch([responses[0], responses[8]]) is not None
    assert cache.batch([responses[0], responses[4]]) is None  # prompt 1 is over the cap: the pixels go in


def test_a_prompt_other_than_the_cached_one_is_an_error(tiny_model, tiny_processor):
    cache = ImageFeatureCache(frozen_tower(tiny_model), 1, "policy")
    responses = iteration_responses(tiny_processor)
    cache.fill(responses, torch.device("cpu"), torch.float32)
    responses[0].prompt.key = "other.tar:0"
    with pytest.raises(RuntimeError, match="other.tar:0"):
        cache.batch(responses[:1])


def test_a_cache_needs_a_frozen_tower(tiny_model):
    with pytest.raises(ValueError, match="critic.freeze"):
        ImageFeatureCache(tiny_model.train(), 1, "critic")
    base = {"prompts": {"train": "unused.tar"}, "policy": {"freeze": []}}
    with pytest.raises(ValueError, match="policy.image_feature_cache_mb=0"):
        RLConfig.from_dict(base)
    RLConfig.from_dict(base | {"policy": {"freeze": [], "image_feature_cache_mb": 0}})
    RLConfig.from_dict(base | {"policy": {"freeze": ["vision_model.", "vit_large_projector."]}})


def test_towers_are_the_same_only_with_the_same_weights(tiny_config):
    models = []
    for seed in (0, 0, 1):
        torch.manual_seed(seed)
        models.append(Step3VLForConditionalGeneration(tiny_config))
    with torch.no_grad():
        models[1].lm_head.weight.add_(1)  # outside the tower: still the same tower
    assert same_tower(models[0], models[1], torch.device("cpu"))
    assert not same_tower(models[0], models[2], torch.device("cpu"))


@pytest.mark.slow
def test_an_iteration_encodes_each_image_once_and_computes_the_same_numbers(tmp_path):
    """2 ZeRO-3 ranks, 16 responses a prompt; see feature_cache_run.py for what each run compares."""
    torch.manual_seed(0)
    Step3VLForConditionalGeneration(load_model_config("tiny")).save_pretrained(tmp_path / "init")
    run_ranks("tests.rl.feature_cache_run", tmp_path, timeout=600)
    from tests.rl.feature_cache_run import check

    for rank in range(2):
        check(rank, torch.load(tmp_path / f"rank{rank}.pt", weights_only=False))
