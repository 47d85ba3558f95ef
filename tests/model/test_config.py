import json

import pytest

from step3vl_train.model import Step3VLConfig
from tests.conftest import load_model_config

# The released config.json as the spec reconstructs it (section 1.2), legacy fields and all.
RELEASED_CONFIG = {
    "architectures": ["StepVLForConditionalGeneration"],
    "auto_map": {
        "AutoConfig": "configuration_step_vl.StepRoboticsConfig",
        "AutoModelForCausalLM": "modeling_step_vl.Step3VL10BForCausalLM",
    },
    "model_type": "step_robotics",
    "im_end_token": "<im_end>",
    "im_patch_token": "<im_patch>",
    "im_start_token": "<im_start>",
    "image_token_len": 169,
    "patch_token_len": 81,
    "image_token_id": 151679,
    "understand_projector_stride": 2,
    "use_im_start_end": "true",
    "vision_select_layer": -1,
    "projector_bias": False,
    "vision_config": {
        "image_size": 728,
        "patch_size": 14,
        "width": 1536,
        "layers": 47,
        "heads": 16,
        "pool_type": "none",
        "output_dim": None,
        "use_cls_token": False,
        "ls_init_value": 0.1,
        "use_ln_post": False,
        "hidden_act": "quick_gelu",
    },
    "text_config": {
        "architectures": ["Qwen3ForCausalLM"],
        "model_type": "qwen3",
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": 151643,
        "eos_token_id": [151643, 151645, 151679],
        "head_dim": 128,
        "hidden_act": "silu",
        "hidden_size": 4096,
        "initializer_range": 0.02,
        "intermediate_size": 12288,
        "max_position_embeddings": 65536,
        "max_window_layers": 36,
        "num_attention_heads": 32,
        "num_hidden_layers": 36,
        "num_key_value_heads": 8,
        "rms_norm_eps": 1e-06,
        "rope_scaling": None,
        "rope_theta": 1000000,
        "vocab_size": 151936,
    },
}


def test_released_config_reads_and_round_trips(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(RELEASED_CONFIG))
    config = Step3VLConfig.from_json_file(path)
    assert config.vision_config.width == 1536 and config.vision_config.grid_size == 52
    assert config.vision_config.mlp_width == 8960
    assert config.text_config.rope_parameters["rope_theta"] == 1000000
    assert config.text_config.num_key_value_heads == 8
    assert config.auto_map == RELEASED_CONFIG["auto_map"]
    written = config.to_released_dict()
    for key in ("architectures", "image_token_id", "projector_bias", "use_im_start_end", "auto_map"):
        assert written[key] == RELEASED_CONFIG[key]
    assert Step3VLConfig.from_dict(written).to_released_dict() == written


def test_preset_matches_released_config():
    released = Step3VLConfig.from_dict(RELEASED_CONFIG).to_released_dict()
    preset = load_model_config("step3vl_10b").to_released_dict()
    assert {k: v for k, v in preset.items() if k != "auto_map"} == {
        k: v for k, v in released.items() if k != "auto_map"
    }


@pytest.mark.parametrize(
    "patch, field",
    [
        ({"hidden_dim": 3}, "hidden_dim"),
        ({"vision_config": {"widht": 3}}, "vision_config.widht"),
        ({"text_config": {"hiden_size": 3}}, "text_config.hiden_size"),
    ],
)
def test_unknown_fields_are_errors_naming_them(patch, field):
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        Step3VLConfig.from_dict({**RELEASED_CONFIG, **patch} if "config" not in field else patch)


def test_config_file_error_names_the_file(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({**RELEASED_CONFIG, "bogus": 1}))
    with pytest.raises(ValueError, match=r"config\.json.*bogus"):
        Step3VLConfig.from_json_file(path)


@pytest.mark.parametrize("field, value", [("use_cls_token", True), ("use_ln_post", True), ("pool_type", "attn")])
def test_unsupported_vision_options_are_rejected(field, value):
    with pytest.raises(ValueError, match=field):
        Step3VLConfig.from_dict({"vision_config": {field: value}})


def test_tied_embeddings_are_rejected():
    with pytest.raises(ValueError, match="untied"):
        Step3VLConfig.from_dict({"text_config": {"tie_word_embeddings": True}})
