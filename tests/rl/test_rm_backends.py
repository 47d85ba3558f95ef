"""The service's backends without Serve: what a replica computes for a batch of items."""

import io

import pytest
from omegaconf import OmegaConf
from PIL import Image

from rl.rm_service.backends import build_backend
from rl.rm_service.config import RMConfig, ScalarRMConfig
from rl.rm_service.items import ScoreItem
from step3vl_train.processing.images import load_image
from step3vl_train.train.reward_model import load_reward_model, reward_conversation, score_samples
from step3vl_train.usage import build
from tests.conftest import REPO

TINY_PROCESSOR = str(REPO / "configs" / "processor" / "tiny.yaml")


def png(colour: str) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (40, 30), colour).save(out, format="PNG")
    return out.getvalue()


def item(index: int, response: str, images: tuple[bytes, ...] = (), reference: str | None = None) -> ScoreItem:
    parts = [{"type": "image"} for _ in images] + [{"type": "text", "text": "What colour is it?"}]
    return ScoreItem(str(index), [{"role": "user", "content": parts}], list(images), response, reference)


def test_the_scalar_backend_scores_as_the_reward_model_does(tiny_reward_model, tiny_processor):
    backend = build_backend(RMConfig(scalar=ScalarRMConfig(model=str(tiny_reward_model), processor=TINY_PROCESSOR)))
    items = [item(0, "<think>red, I think</think>It is red.", (png("red"),)), item(1, "A number: 14."), item(2, "x")]
    verdicts = backend.score(items)
    model, stats = load_reward_model(tiny_reward_model)
    expected = score_samples(
        model,
        [tiny_processor(reward_conversation(i.messages, i.response), [load_image(d) for d in i.images]) for i in items],
        tiny_processor.tokenizer.pad_token_id,
    )
    for verdict, raw in zip(verdicts, expected, strict=True):
        assert verdict.status == "ok"
        assert verdict.components["rm/raw"] == pytest.approx(raw, abs=1e-5)
        assert verdict.preference == pytest.approx(stats.preference(raw), abs=1e-6) and 0 < verdict.preference < 1
    # Only the final answer is scored: the reasoning before </think> changes nothing.
    again = backend.score([item(0, "<think>something else entirely</think>It is red.", (png("red"),))])
    assert again[0].preference == pytest.approx(verdicts[0].preference, abs=1e-6)


def test_a_bad_item_is_masked_and_the_rest_of_its_batch_scored(tiny_reward_model):
    config = ScalarRMConfig(model=str(tiny_reward_model), processor=TINY_PROCESSOR, max_tokens=60)
    backend = build_backend(RMConfig(scalar=config))
    verdicts = backend.score(
        [item(0, "Fine."), item(1, "Fine.", (b"not an image",)), item(2, "long " * 200), item(3, "Also fine.")]
    )
    assert [v.status for v in verdicts] == ["ok", "error", "error", "ok"]
    assert "image" in verdicts[1].detail and "rm.scalar.max_tokens=60" in verdicts[2].detail
    assert verdicts[1].preference is None and verdicts[2].preference is None


def test_a_genrm_whose_judge_does_not_answer_in_format_masks_every_item():
    """A random tiny judge on our transformers engine: its replies never parse, so no item gets a score."""
    tiny = OmegaConf.to_container(OmegaConf.load(REPO / "configs" / "model" / "tiny.yaml"))
    judge = {"backend": "hf", "model_config": tiny, "processor": OmegaConf.to_container(OmegaConf.load(TINY_PROCESSOR)),
             "max_new_tokens": 6}  # fmt: skip
    backend = build_backend(build(RMConfig, {"backend": "genrm", "judge": judge}, "rm."))
    assert backend.needs_reference
    verdicts = backend.score([item(0, "It is red.", (png("red"),), "Red."), item(1, "Blue.", (), "Blue.")])
    assert [v.status for v in verdicts] == ["unparsed", "unparsed"]
    assert all(v.preference is None for v in verdicts)


def test_a_users_backend_by_import_path():
    backend = build_backend(RMConfig(backend="tests.rl.rm_stubs:ScriptedBackend", options={"preference": 0.25}))
    assert [v.preference for v in backend.score([item(0, "a"), item(1, "b")])] == [0.25, 0.25]
