"""The processor a model directory carries, so that whoever loads the model plans its images as it was trained.

An export writes `processor_config.json` (the image settings the run trained with, `image_settings`, and
`auto_map` naming `processing_step3.Step3VLHFProcessor`, shipped beside it: hf_processor.py), the chat
template (`chat_template.jinja`) and the tokenizer. Tools that load a model read its settings back and take
from the user only the fields they give, refusing settings the model's vision tower was not built for.
StepFun's release carries a `processor_config.json` with `auto_map` alone: its settings are the released
processor's, ProcessorConfig's defaults.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from step3vl_train.model.config import Step3VLConfig
from step3vl_train.model.remote_code import write_remote_code
from step3vl_train.processing.config import ProcessorConfig
from step3vl_train.processing.hf_processor import Step3VLHFProcessor
from step3vl_train.processing.processor import Step3VLProcessor
from step3vl_train.usage import UsageError

PROCESSOR_FILE = "processor_config.json"  # what transformers' AutoProcessor reads first
SETTINGS_KEY = "image_settings"


def save_processor(processor: Step3VLProcessor, directory: str | Path) -> None:
    """Writes the processor into a model directory: its tokenizer, chat template, image settings and code."""
    hf_processor = Step3VLHFProcessor(processor.tokenizer, processor.chat_template, asdict(processor.config))
    hf_processor.auto_map = {"AutoProcessor": write_remote_code(Step3VLHFProcessor, Path(directory))}
    hf_processor.save_pretrained(directory)


def saved_settings(directory: str | Path) -> dict[str, Any]:
    """The image settings a model directory carries; {} where it carries none (StepFun's release, an export
    written before exports carried them, a directory that is not there)."""
    path = Path(directory) / PROCESSOR_FILE
    return json.loads(path.read_text()).get(SETTINGS_KEY, {}) if path.is_file() else {}


def model_settings(
    directory: str | Path | None, given: str | dict[str, Any] | None, model_config: Step3VLConfig, key: str
) -> dict[str, Any]:
    """The settings to run a model with: its directory's, with the fields `given` (what the config key
    `key` sets: a processor YAML or a mapping) over them. Raises UsageError where the two together plan
    images into another token layout than the model's vision tower takes."""
    if isinstance(given, str):
        given = OmegaConf.to_container(OmegaConf.load(given), resolve=True)
    given = given or {}
    settings = {**(saved_settings(directory) if directory else {}), **given}
    check_image_layout(ProcessorConfig.from_dict(settings), model_config, key, bool(given))
    return settings


def check_image_layout(config: ProcessorConfig, model_config: Step3VLConfig, key: str, given: bool) -> None:
    """Raises UsageError where `config` cuts images into other views than the model takes: a global view of
    another side than its vision tower's, other patches, or another projector stride."""
    vision = model_config.vision_config
    expected = {
        "image_size": vision.image_size,
        "patch_size": vision.patch_size,
        "downsample_stride": model_config.understand_projector_stride**2,
    }
    wrong = {name: value for name, value in expected.items() if getattr(config, name) != value}
    if not wrong:
        return
    settings = ", ".join(f"{name}={getattr(config, name)}" for name in wrong)
    model = ", ".join(f"{name}={value}" for name, value in wrong.items())
    fix = (
        f"drop {key} to use the model's own, or set {key} to a processor with {model}"
        if given
        else f"set {key} to the processor it was trained with (configs/processor/*.yaml)"
    )
    raise UsageError(f"{key}: the processor has {settings} where the model's vision tower takes {model}: {fix}")
