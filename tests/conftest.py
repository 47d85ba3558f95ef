from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from step3vl_train.data.synthetic import write_corpus
from step3vl_train.model import Step3VLConfig, Step3VLForConditionalGeneration
from step3vl_train.processing.processor import load_processor

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


@pytest.fixture(scope="session")
def tiny_processor():
    return load_processor("tiny", str(REPO / "configs" / "processor" / "tiny.yaml"))


@pytest.fixture(scope="session")
def released_processor():
    """The released processor's image sizes with the tiny tokenizer: full-size token counts."""
    return load_processor("tiny", None)


@pytest.fixture(scope="session")
def pretrain_corpus(tmp_path_factory):
    out = tmp_path_factory.mktemp("synthetic") / "pretrain"
    write_corpus("pretrain", str(out), num=160, seed=0, shard_size=5)
    write_corpus("pretrain", str(out / "heldout"), num=24, seed=1, shard_size=5)  # +cpu=pretrain validates on it
    return out


@pytest.fixture(scope="session")
def sft_corpus(tmp_path_factory):
    out = tmp_path_factory.mktemp("synthetic") / "sft"
    write_corpus("sft", str(out), num=120, seed=0, shard_size=5)
    return out
