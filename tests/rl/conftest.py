import pytest
import torch

from step3vl_train.data.synthetic import write_corpus
from step3vl_train.model import Step3VLForConditionalGeneration
from step3vl_train.model.value import Step3VLForValue
from step3vl_train.processing.processor import load_processor
from step3vl_train.processing.tokenizer import load_tokenizer
from step3vl_train.train.reward_model import RewardStats
from tests.conftest import REPO, load_model_config
from tests.rl.format_task import train_format_model, write_pooled_prompts, write_prompts


@pytest.fixture(scope="session")
def exported_tiny_model(tmp_path_factory):
    """A tiny model with weights large enough that sampling depends on the context, in the released layout."""
    torch.manual_seed(0)
    model = Step3VLForConditionalGeneration(load_model_config("tiny"))
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0, 0.3)
    out = tmp_path_factory.mktemp("tiny") / "model"
    model.save_pretrained(out)
    load_tokenizer("tiny").save_pretrained(out)  # as an export carries it; vLLM reads it from there
    return out


@pytest.fixture(scope="session")
def secret_task(tmp_path_factory):
    """(prompt shards of the secret-digit task, a tiny policy that has learned its answer format)."""
    root = tmp_path_factory.mktemp("secret")
    processor = load_processor("tiny", str(REPO / "configs" / "processor" / "tiny.yaml"))
    model = train_format_model(load_model_config("tiny"), processor, root / "format_model")
    return write_prompts(root / "prompts", 64), model


@pytest.fixture(scope="session")
def pacore_task(tmp_path_factory):
    """(PaCoRe prompt shards of the secret-digit task, each with its own secret and a pool that mostly boxes
    it; a tiny policy that has learned the answer format, under the synthesis template too)."""
    root = tmp_path_factory.mktemp("pacore")
    processor = load_processor("tiny", str(REPO / "configs" / "processor" / "tiny.yaml"))
    model = train_format_model(load_model_config("tiny"), processor, root / "format_model", steps=200, reads=0.5)
    return write_pooled_prompts(root / "prompts", 64), model


@pytest.fixture(scope="session")
def tiny_reward_model(tmp_path_factory):
    """A random tiny scalar reward model in the layout an RM export has (value head, reward_stats.json)."""
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("rm") / "model"
    Step3VLForValue(load_model_config("tiny")).save_pretrained(out)
    load_tokenizer("tiny").save_pretrained(out)
    RewardStats(mean=0.0, std=1.0).save(out)
    return out


@pytest.fixture(scope="session")
def rlhf_corpus(tmp_path_factory):
    out = tmp_path_factory.mktemp("synthetic") / "rlhf"
    write_corpus("rlhf", str(out), num=40, seed=0, shard_size=5)
    return out


@pytest.fixture(scope="session")
def rl_corpus(tmp_path_factory):
    out = tmp_path_factory.mktemp("synthetic") / "rl"
    write_corpus("rl", str(out), num=100, seed=0, shard_size=5)
    return out
