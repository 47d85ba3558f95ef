"""Model configuration in the released `config.json` layout (spec sections 1.2 and 2).

`Step3VLConfig` reads and writes the released file: `vision_config` keeps Perception Encoder's field
names, `text_config` is a Qwen3 config, and the legacy Step-3 fields the 10B code ignores are kept so a
round trip loses nothing. Every entry point (YAML preset, `config.json`) goes through
`Step3VLConfig.from_dict`, which rejects fields it does not know.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from huggingface_hub.dataclasses import strict
from transformers import PreTrainedConfig, Qwen3Config
from transformers.configuration_utils import SubConfigSpec

# Keys older transformers wrote into a Qwen3 config that the current class folds into other fields.
_LEGACY_TEXT_KEYS = {"rope_theta", "rope_scaling"}
# Options transformers' loaders pass to `from_dict` beside the file's contents (telemetry, defaults).
_LOADING_OPTIONS = {"_from_auto", "_from_pipeline", "attn_implementation", "dtype", "torch_dtype"}
# Bookkeeping keys that transformers writes into any config; accepted on read, not written back.
_SERIALISATION_KEYS = {
    "torch_dtype",
    "dtype",
    "transformers_version",
    "model_type",
    "_name_or_path",
    "output_attentions",
}


@strict
class Step3VLVisionConfig(PreTrainedConfig):
    """PE-lang vision trunk (Perception Encoder naming) plus the two stride-2 downsamplers."""

    model_type = "step_robotics_vision"
    # `from_pretrained` on a model's directory reads this entry of its `config.json`, which names no model_type.
    base_config_key = "vision_config"

    image_size: int = 728  # side of the learned position table's image; the table is (image_size/patch)^2
    patch_size: int = 14
    width: int = 1536
    layers: int = 47
    heads: int = 16
    mlp_ratio: float = 8960 / 1536
    ls_init_value: float | None = 0.1
    layer_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    hidden_act: str = "quick_gelu"
    use_ln_pre: bool = True
    use_ln_post: bool = False
    use_cls_token: bool = False
    use_abs_posemb: bool = True
    use_rope2d: bool = True
    pool_type: str = "none"
    output_dim: int | None = None
    initializer_range: float = 0.02

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        unsupported = {
            "use_cls_token": (self.use_cls_token, False),
            "use_ln_post": (self.use_ln_post, False),
            "pool_type": (self.pool_type, "none"),
            "output_dim": (self.output_dim, None),
            "use_abs_posemb": (self.use_abs_posemb, True),
            "use_rope2d": (self.use_rope2d, True),
            "hidden_act": (self.hidden_act, "quick_gelu"),
        }
        for name, (value, supported) in unsupported.items():
            if value != supported:
                raise ValueError(f"vision_config.{name}={value!r} is not supported (STEP3-VL uses {supported!r})")
        if self.image_size % self.patch_size or self.width % self.heads:
            raise ValueError(
                f"vision_config: image_size {self.image_size} must be a multiple of patch_size {self.patch_size}"
                f" and width {self.width} a multiple of heads {self.heads}"
            )

    @property
    def grid_size(self) -> int:
        """Side of the learned position table: 728 / 14 = 52."""
        return self.image_size // self.patch_size

    @property
    def mlp_width(self) -> int:
        return int(self.width * self.mlp_ratio)


_VISION_FIELDS = {
    "image_size",
    "patch_size",
    "width",
    "layers",
    "heads",
    "mlp_ratio",
    "ls_init_value",
    "layer_norm_eps",
    "rope_theta",
    "hidden_act",
    "use_ln_pre",
    "use_ln_post",
    "use_cls_token",
    "use_abs_posemb",
    "use_rope2d",
    "pool_type",
    "output_dim",
    "initializer_range",
}


@strict
class Step3VLConfig(PreTrainedConfig):
    model_type = "step_robotics"
    sub_configs_defaults = {
        "vision_config": SubConfigSpec(config_class=Step3VLVisionConfig),
        "text_config": SubConfigSpec(config_class=Qwen3Config),
    }

    vision_config: dict | Step3VLVisionConfig | None = None
    text_config: dict | Qwen3Config | None = None
    image_token_id: int = 151679
    projector_bias: bool = False
    understand_projector_stride: int = 2
    tie_word_embeddings: bool = False
    # Legacy Step-3 fields: present in the released file, not read by the 10B model.
    im_start_token: str = "<im_start>"
    im_end_token: str = "<im_end>"
    im_patch_token: str = "<im_patch>"
    image_token_len: int = 169
    patch_token_len: int = 81
    use_im_start_end: str | bool = "true"
    vision_select_layer: int = -1
    auto_map: dict | None = None

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        if self.understand_projector_stride != 2:
            raise ValueError("understand_projector_stride must be 2: the projector is two stride-2 convolutions")
        if self.tie_word_embeddings or self.text_config.tie_word_embeddings:
            raise ValueError("STEP3-VL keeps an untied lm_head; set tie_word_embeddings=false")
        if not 0 <= self.image_token_id < self.text_config.vocab_size:
            raise ValueError(f"image_token_id {self.image_token_id} outside vocab_size {self.text_config.vocab_size}")

    @property
    def hidden_size(self) -> int:
        return self.text_config.hidden_size

    @classmethod
    def from_dict(cls, config_dict: dict[str, Any], **options) -> Step3VLConfig:
        """Builds the config from a `config.json`-shaped dict; unknown fields anywhere are an error.
        `options` are what `AutoConfig.from_pretrained` hands every config class (an export carries this
        file as its configuration module, see model/checkpoint.py): `name_or_path` is kept, none of them
        is a field of the file, and any other is an error."""
        return_unused = options.pop("return_unused_kwargs", False)
        name_or_path = options.pop("name_or_path", "")
        unknown = sorted(set(options) - _LOADING_OPTIONS)
        if unknown:
            raise ValueError(f"unknown loading option(s): {', '.join(unknown)}")
        config = cls._from_file_dict(config_dict)
        config.name_or_path = name_or_path
        return (config, {}) if return_unused else config

    @classmethod
    def _from_file_dict(cls, config_dict: dict[str, Any]) -> Step3VLConfig:
        _reject_unknown(config_dict, _field_names(cls) | _SERIALISATION_KEYS | {"architectures"}, "")
        vision = config_dict.get("vision_config") or {}
        _reject_unknown(vision, _VISION_FIELDS, "vision_config.")
        text = dict(config_dict.get("text_config") or {})
        _reject_unknown(text, _field_names(Qwen3Config) | _LEGACY_TEXT_KEYS | _SERIALISATION_KEYS, "text_config.")
        text = {k: v for k, v in text.items() if k not in _SERIALISATION_KEYS - {"dtype"}}
        fields = {k: v for k, v in config_dict.items() if k not in _SERIALISATION_KEYS}
        fields["vision_config"] = Step3VLVisionConfig(**vision)
        fields["text_config"] = Qwen3Config(**text)
        return cls(**fields)

    @classmethod
    def from_json_file(cls, path: str | Path) -> Step3VLConfig:
        try:
            return cls.from_dict(json.loads(Path(path).read_text()))
        except (ValueError, TypeError) as err:
            raise ValueError(f"{path}: {err}") from err

    def to_released_dict(self) -> dict[str, Any]:
        """The `config.json` layout of the released checkpoint."""
        text = {k: v for k, v in self.text_config.to_dict().items() if k not in _SERIALISATION_KEYS - {"model_type"}}
        out = {
            "architectures": ["StepVLForConditionalGeneration"],
            "model_type": self.model_type,
            # The encoder's own fields only, not PreTrainedConfig's generic ones.
            "vision_config": {name: getattr(self.vision_config, name) for name in sorted(_VISION_FIELDS)},
            "text_config": text,
        }
        for name in _field_names(Step3VLConfig) - _field_names(PreTrainedConfig) - {"vision_config", "text_config"}:
            value = getattr(self, name)
            if value is not None:
                out[name] = value
        return out


def _field_names(cls) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}


def _reject_unknown(given: dict, known: set[str], prefix: str) -> None:
    unknown = sorted(set(given) - known)
    if unknown:
        raise ValueError(f"unknown config field(s): {', '.join(prefix + k for k in unknown)}")
