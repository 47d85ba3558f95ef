"""transformers' Auto classes open our exports: through the registration `import step3vl_train` makes, and
through `auto_map` and `trust_remote_code` where step3vl_train is not there (model/remote_code.py)."""

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText, Qwen3Config
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

from step3vl_train.model import (
    Step3VLConfig,
    Step3VLForConditionalGeneration,
    Step3VLVisionConfig,
    register_auto_classes,
)
from step3vl_train.model.checkpoint import read_released_tensors
from step3vl_train.model.remote_code import relative_imports
from tests.conftest import REPO, load_model_config

IDS = torch.randint(11, 1000, (1, 9), generator=torch.Generator().manual_seed(0))
# transformers' words when a config class reads a `config.json` of another model_type.
TYPE_MISMATCH = "You are using a model of type"


@pytest.fixture(scope="module")
def export(tmp_path_factory) -> tuple[Path, torch.Tensor]:
    """A tiny model's export and its logits for IDS."""
    torch.manual_seed(0)
    model = Step3VLForConditionalGeneration(load_model_config("tiny")).eval()
    directory = tmp_path_factory.mktemp("export") / "tiny"
    model.save_pretrained(directory)
    with torch.no_grad():
        return directory, model(input_ids=IDS).logits


def run_python(script: str, *args, cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", script, *map(str, args)], cwd=cwd, env=env, capture_output=True, text=True
    )


def test_import_registers_our_classes_with_the_auto_classes(export, tmp_path):
    directory, logits = export
    script = (
        "import sys, step3vl_train\n"
        "from transformers import AutoConfig\n"
        "print(type(AutoConfig.from_pretrained(sys.argv[1])).__module__)"
    )
    done = run_python(script, directory, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "step3vl_train.model.config"  # `import step3vl_train` alone registers

    assert type(AutoConfig.from_pretrained(directory)) is Step3VLConfig
    for auto_class in (AutoModelForImageTextToText, AutoModelForCausalLM):
        model = auto_class.from_pretrained(directory)
        assert type(model) is Step3VLForConditionalGeneration
        with torch.no_grad():
            assert torch.equal(model(input_ids=IDS).logits, logits)
    bf16 = AutoModelForImageTextToText.from_pretrained(directory, dtype=torch.bfloat16)
    assert bf16.lm_head.weight.dtype == torch.bfloat16


def test_registering_again_or_over_a_transformers_name_does_not_raise(export, monkeypatch):
    monkeypatch.setitem(CONFIG_MAPPING._mapping, "step_robotics", "Step3p7Config")
    register_auto_classes()
    register_auto_classes()
    assert type(AutoConfig.from_pretrained(export[0])) is Step3VLConfig


def test_options_the_auto_classes_do_not_pass_are_refused(export):
    with pytest.raises(TypeError, match="unsupported option.*device_map"):
        Step3VLForConditionalGeneration.from_pretrained(export[0], device_map="auto")


# A fresh interpreter in which step3vl_train cannot be imported (it is installed editable, so it would be).
WITHOUT_THE_PACKAGE = """
import sys
class RefuseThePackage:
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] == "step3vl_train":
            raise ImportError(f"the export's code imported {name}")
sys.meta_path.insert(0, RefuseThePackage())
"""
REMOTE_LOAD = (
    WITHOUT_THE_PACKAGE
    + """
import inspect
import torch
from transformers import AutoModelForCausalLM, AutoModelForImageTextToText
export, ids, out = sys.argv[1:]
model = AutoModelForImageTextToText.from_pretrained(export, trust_remote_code=True)
with torch.no_grad():
    logits = model(input_ids=torch.load(ids)).logits
causal = AutoModelForCausalLM.from_pretrained(export, trust_remote_code=True)
source = inspect.getsourcefile(type(model))
torch.save({"logits": logits, "source": source, "causal": type(causal) is type(model)}, out + "/result.pt")
model.save_pretrained(out + "/resaved")
"""
)


def test_trust_remote_code_loads_an_export_without_the_package(export, tmp_path):
    directory, logits = export
    torch.save(IDS, tmp_path / "ids.pt")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"HF_MODULES_CACHE": str(tmp_path / "hf")}
    done = run_python(REMOTE_LOAD, directory, tmp_path / "ids.pt", tmp_path, cwd=tmp_path, env=env)
    assert done.returncode == 0, done.stderr[-4000:]
    result = torch.load(tmp_path / "result.pt")
    assert Path(result["source"]).is_relative_to(tmp_path / "hf" / "transformers_modules")
    assert Path(result["source"]).name == "modeling_step_vl.py" and result["causal"]
    assert torch.equal(result["logits"], logits)
    assert TYPE_MISMATCH not in done.stderr
    # Saved from the copies transformers loaded: the same directory again.
    resaved = tmp_path / "resaved"
    assert sorted(p.name for p in resaved.iterdir()) == sorted(p.name for p in directory.iterdir())
    for path in [*directory.glob("*.py"), directory / "config.json"]:
        assert (resaved / path.name).read_text() == path.read_text(), path.name
    assert read_released_tensors(resaved).keys() == read_released_tensors(directory).keys()


def test_an_exports_modules_import_only_each_other_and_installed_packages(export):
    directory = export[0]
    auto_map = json.loads((directory / "config.json").read_text())["auto_map"]
    model_reference = "modeling_step_vl.Step3VLForConditionalGeneration"
    assert auto_map == {
        "AutoConfig": "configuration_step_vl.Step3VLConfig",
        "AutoModelForCausalLM": model_reference,
        "AutoModelForImageTextToText": model_reference,
    }
    # vLLM imports the configuration module alone: it stays config.py as it is.
    config_source = (REPO / "step3vl_train" / "model" / "config.py").read_text()
    assert (directory / "configuration_step_vl.py").read_text() == config_source
    modules = {path.stem for path in directory.glob("*.py")}
    assert {"modeling_step_vl", "vision", "checkpoint"} <= modules and "step3vl" not in modules
    for path in directory.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level:
                assert node.module in modules, f"{path.name} imports .{node.module}, not in the export"
            elif isinstance(node, ast.ImportFrom | ast.Import):
                names = [node.module] if isinstance(node, ast.ImportFrom) else [a.name for a in node.names]
                assert not any(name.startswith("step3vl_train") for name in names), path.name


def test_package_imports_become_relative_under_export_names():
    source = (
        "from step3vl_train.model.config import Step3VLConfig\n"
        "from step3vl_train.model.vision import StepVisionEncoder\n"
        "def load():\n"
        "    from step3vl_train.model.step3vl import Step3VLForConditionalGeneration\n"
    )
    assert relative_imports(source, "checkpoint", "step3vl_train.model") == (
        "from .configuration_step_vl import Step3VLConfig\n"
        "from .vision import StepVisionEncoder\n"
        "def load():\n"
        "    from .modeling_step_vl import Step3VLForConditionalGeneration\n"
    )


@pytest.mark.parametrize(
    "line", ["import step3vl_train.model.attention", "from step3vl_train.processing.chat import render_chat"]
)
def test_a_package_import_that_cannot_be_made_relative_is_an_error(line):
    with pytest.raises(ValueError, match=rf"step3vl\.py: {line}"):
        relative_imports(f"import torch\n{line}\n", "step3vl", "step3vl_train.model")


def test_loading_an_export_or_its_sub_configs_warns_nothing(export, caplog):
    directory = export[0]
    transformers.logging.enable_propagation()
    try:
        with caplog.at_level("WARNING", logger="transformers"):
            vision = Step3VLVisionConfig.from_pretrained(directory)
            text = Qwen3Config.from_pretrained(directory)
            Step3VLConfig.from_pretrained(directory)
            AutoConfig.from_pretrained(directory)
            AutoModelForImageTextToText.from_pretrained(directory)
            Step3VLForConditionalGeneration.from_pretrained(directory)
    finally:
        transformers.logging.disable_propagation()
    assert [record.getMessage() for record in caplog.records if record.levelname == "WARNING"] == []
    tiny = load_model_config("tiny")
    assert vision.to_dict() == tiny.vision_config.to_dict()  # the `vision_config` entry, not the top level
    assert text.num_hidden_layers == tiny.text_config.num_hidden_layers
