import pytest
import torch

from step3vl_train.model import Step3VLForConditionalGeneration
from tests.conftest import load_model_config


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
    return out
