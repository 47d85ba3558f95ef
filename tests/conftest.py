from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from step3vl_train.model import Step3VLConfig, Step3VLForConditionalGeneration

REPO = Path(__file__).resolve().parents[1]


def load_model_config(name: str) -> Step3VLConfig:
    return Step3VLConfig.from_dict(OmegaConf.to_container(OmegaConf.load(REPO / "configs" / "model" / f"{name}.yaml")))


@pytest.fixture
def tiny_config() -> Step3VLConfig:
    return load_model_config("tiny")


@pytest.fixture
def tiny_model(tiny_config) -> Step3VLForConditionalGeneration:
    torch.manual_seed(0)
    return Step3VLForConditionalGeneration(tiny_config).eval()
