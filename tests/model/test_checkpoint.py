import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from step3vl_train.model import Step3VLForConditionalGeneration
from step3vl_train.model.checkpoint import INDEX_NAME, CheckpointMismatchError
from step3vl_train.model.counting import build_on_meta, count_parameters
from tests.conftest import REPO, load_model_config

# A copy of ../shared/reference/step3vl_10b_tensors.json: the released layout is a contract of this repo.
REFERENCE = json.loads((Path(__file__).parent / "step3vl_10b_tensors.json").read_text())


def test_save_then_load_is_bit_exact(tiny_model, tmp_path):
    tiny_model.save_pretrained(tmp_path / "ckpt", max_shard_size=300_000)
    files = sorted(p.name for p in (tmp_path / "ckpt").iterdir())
    shards = [f for f in files if f.startswith("model-")]
    assert len(shards) > 1 and shards[0].endswith(f"-of-{len(shards):05d}.safetensors")
    assert {"config.json", "configuration_step_vl.py", "modeling_step_vl.py", INDEX_NAME} <= set(files)
    index = json.loads((tmp_path / "ckpt" / INDEX_NAME).read_text())
    assert set(index["weight_map"]) == set(tiny_model.state_dict())

    loaded = Step3VLForConditionalGeneration.from_pretrained(tmp_path / "ckpt")
    # config.json names the code written beside it, as the released checkpoint does (test_auto_classes.py)
    model_reference = "modeling_step_vl.Step3VLForConditionalGeneration"
    auto_map = {
        "AutoConfig": "configuration_step_vl.Step3VLConfig",
        "AutoModelForCausalLM": model_reference,
        "AutoModelForImageTextToText": model_reference,
    }
    assert loaded.config.to_released_dict() == {**tiny_model.config.to_released_dict(), "auto_map": auto_map}
    for name, tensor in tiny_model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    ids = torch.randint(11, 1000, (1, 9))
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, tiny_model(input_ids=ids).logits)


def test_saving_over_an_existing_directory_replaces_it(tiny_model, tmp_path):
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "model-00001-of-00009.safetensors").write_text("stale")
    tiny_model.save_pretrained(tmp_path / "ckpt")
    assert not (tmp_path / "ckpt" / "model-00001-of-00009.safetensors").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]  # no staging directory left behind


def test_missing_and_unexpected_tensors_are_listed(tiny_model, tmp_path):
    tiny_model.save_pretrained(tmp_path / "ckpt")
    shard = tmp_path / "ckpt" / "model.safetensors"
    if not shard.exists():
        shard = next((tmp_path / "ckpt").glob("model-*.safetensors"))
    tensors = load_file(shard)
    tensors.pop("vit_large_projector.weight")
    tensors["vision_model.class_embedding"] = torch.zeros(64)
    save_file(tensors, shard)
    index_path = tmp_path / "ckpt" / INDEX_NAME
    index = json.loads(index_path.read_text())
    index["weight_map"]["vision_model.class_embedding"] = shard.name
    index_path.write_text(json.dumps(index))
    with pytest.raises(
        CheckpointMismatchError,
        match=r"missing \(1\): vit_large_projector\.weight.*"
        r"unexpected \(1\): vision_model\.class_embedding",
    ):
        Step3VLForConditionalGeneration.from_pretrained(tmp_path / "ckpt")


def test_full_size_model_on_meta_has_the_released_tensors():
    model = build_on_meta(load_model_config("step3vl_10b"))
    assert {n: list(t.shape) for n, t in model.state_dict().items()} == REFERENCE["tensors"]
    assert count_parameters(model) == REFERENCE["parameters"]


def test_inspect_model_tool(tmp_path):
    out = tmp_path / "report.json"
    result = subprocess.run(
        [sys.executable, "launch/inspect_model.py", "model=step3vl_10b", f"+out={out}"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    )
    report = json.loads(out.read_text())
    assert json.loads(result.stdout) == report
    assert report["tensors"] == REFERENCE["tensors"]
    assert report["parameters"]["total"] == 10_171_750_144


def test_an_export_opens_with_autoconfig_as_the_release_does(tiny_model, tmp_path):
    from transformers import AutoConfig

    tiny_model.save_pretrained(tmp_path / "ckpt")
    config = AutoConfig.from_pretrained(tmp_path / "ckpt", trust_remote_code=True)
    assert type(config).__name__ == "Step3VLConfig" and config.model_type == "step_robotics"
    assert config.to_released_dict()["vision_config"] == tiny_model.config.to_released_dict()["vision_config"]
    assert config.name_or_path == str(tmp_path / "ckpt")
