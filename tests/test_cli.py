"""Our messages for config mistakes, before Hydra's: what each says and what it offers."""

import pytest

from step3vl_train.cli import check_composition, errors_folder
from step3vl_train.usage import UsageError


def refusal(config_name: str, *arguments: str) -> str:
    with pytest.raises(UsageError) as error:
        check_composition(config_name, list(arguments))
    return str(error.value)


@pytest.mark.parametrize("config_name", ["pretrain", "rl"])
def test_a_misspelled_key_gets_did_you_mean_without_hydras_plus_advice(config_name):
    message = refusal(config_name, "trainer.max_step=5")
    assert message == "unknown config key trainer.max_step: did you mean trainer.max_steps?"
    assert refusal(config_name, "trainr.max_steps=5").endswith("did you mean trainer.max_steps?")


def test_only_the_recipes_and_cpu_forms_a_script_runs_are_offered():
    message = refusal("pretrain", "+recipe=phse1")
    assert message.startswith("+recipe=phse1 is not one this script runs: phase1, phase2, pretrain")
    assert "rlvr" not in message and "pacore" not in message
    assert "rlvr" in refusal("rl", "+recipe=phase1")
    assert refusal("pretrain", "+recipe=rlvr").startswith("+recipe=rlvr is not one this script runs")
    assert refusal("pretrain", "data=nothing") == "data=nothing: no such option; data has default"


def test_a_missing_tokenizer_names_the_cpu_forms():
    message = refusal("pretrain", "+recipe=phase1")
    assert message.startswith("tokenizer has no value: give tokenizer=DIR")
    assert "+cpu=pretrain|sft" in message
    check_composition("pretrain", ["+recipe=phase1", "+cpu=pretrain"])  # composes: nothing to say


def test_a_tool_without_a_run_directory_writes_its_traceback_outside_the_working_directory(tmp_path):
    from omegaconf import OmegaConf

    assert errors_folder(OmegaConf.create({"trainer": {"output_dir": str(tmp_path)}})) == tmp_path / "errors"
    assert errors_folder(OmegaConf.create({"out": str(tmp_path)})) == tmp_path / "errors"
    assert errors_folder(OmegaConf.create({"port": 1})).name == "step3vl-errors"
