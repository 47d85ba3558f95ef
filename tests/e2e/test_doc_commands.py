"""The commands of README.md and docs/: those for GPUs composed and checked here (every key known, every
value valid), those for the CPU run as written by tests/e2e/test_walkthrough.py."""

import subprocess

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from launch.evaluate import SHORTCUTS as EVALUATE_SHORTCUTS
from launch.pacore import SHORTCUTS as PACORE_SHORTCUTS
from rl.config import RENAMED_KEYS, RLConfig
from rl.evaluation.config import EvaluateConfig
from rl.pacore.inference import InferenceConfig
from rl.rm_service.config import ServiceConfig
from step3vl_train.cli import CONFIGS, check_arguments, expand_shortcuts
from step3vl_train.data.config import DataConfig
from step3vl_train.model import Step3VLConfig
from step3vl_train.train.config import TrainJobConfig
from step3vl_train.train.recipes import register_recipes
from step3vl_train.train.reward_data import PairDataConfig
from step3vl_train.train.reward_trainer import RewardJobConfig
from step3vl_train.usage import build
from tests.conftest import REPO
from tests.e2e.docs import Command, commands, script_and_overrides
from tests.e2e.test_walkthrough import WALKTHROUGH

HYDRA_SCRIPTS = {
    "launch/pretrain.py": "pretrain",
    "launch/sft.py": "sft",
    "rl/run.py": "rl",
    "launch/assemble_init.py": "assemble_init",
    "launch/export_hf.py": "export",
    "launch/train_rm.py": "train_rm",
    "rl/serve_rm.py": "serve_rm",
    "launch/pacore.py": "pacore",
    "launch/evaluate.py": "evaluate",
}
SHORTCUTS = {"launch/pacore.py": PACORE_SHORTCUTS, "launch/evaluate.py": EVALUATE_SHORTCUTS}
FILTERS = ("data/filter_difficulty.py", "data/filter_synthesis.py")  # argparse, then `--` and RL overrides
GPU_COMMANDS = [c for c in commands() if c.gpu]


def composed(config_name: str, overrides: list[str]):
    register_recipes()
    with initialize_config_dir(str(CONFIGS), version_base="1.3"):
        return compose(config_name, overrides)


def check(config_name: str, overrides: list[str]) -> None:
    """As the script would take them, up to the point where it needs the files and GPUs named."""
    check_arguments(overrides, RENAMED_KEYS if config_name == "rl" else {})
    cfg = composed(config_name, overrides)
    if config_name in ("pretrain", "sft"):
        job = build(TrainJobConfig, cfg)
        Step3VLConfig.from_dict(job.model)
        build(DataConfig, job.data, "data.")
    elif config_name == "train_rm":
        job = build(RewardJobConfig, cfg)
        Step3VLConfig.from_dict(job.model)
        build(PairDataConfig, job.data, "data.")
    elif config_name == "rl":
        config = RLConfig.from_dict(OmegaConf.to_container(cfg, resolve=True))
        if config.reward.service.launch:
            ServiceConfig.from_dict(config.reward.service.server, "reward.service.server.")
    elif config_name == "pacore":
        build(InferenceConfig, OmegaConf.to_container(cfg, resolve=True))
    elif config_name == "evaluate":
        build(EvaluateConfig, OmegaConf.to_container(cfg, resolve=True))
    elif config_name == "serve_rm":
        raw = OmegaConf.to_container(cfg, resolve=True)
        raw.pop("ray")
        ServiceConfig.from_dict(raw)


@pytest.mark.parametrize("command", GPU_COMMANDS, ids=str)
def test_gpu_commands_compose_into_valid_configs(command: Command):
    if command.words[0] == "bash":
        script = REPO / command.words[1]
        assert script.is_file(), command
        assert subprocess.run(["bash", "-n", str(script)]).returncode == 0, command
        return
    script, arguments = script_and_overrides(command)
    assert (REPO / script).is_file(), command
    if script in FILTERS:
        check("rl", arguments[arguments.index("--") + 1 :])
    elif script in SHORTCUTS:
        check(HYDRA_SCRIPTS[script], expand_shortcuts(arguments, SHORTCUTS[script]))
    else:
        check(HYDRA_SCRIPTS[script], arguments)


def test_every_cpu_command_is_run_by_the_walkthrough():
    """A new ```bash block (not marked gpu) must be added to the walkthrough, in its document's order."""
    cpu = [c.document for c in commands() if not c.gpu]
    assert sorted(set(cpu)) == sorted(WALKTHROUGH), "documents with CPU commands vs the walkthrough's"


def test_a_drifted_command_fails_the_check(tmp_path):
    """The check above can fail: an old key name, an unknown key and a bad value are each refused."""
    doc = tmp_path / "doc.md"
    doc.write_text(
        "```bash gpu\n"
        "python rl/run.py stage=rlvr run.max_steps=3\n"
        "torchrun --nproc_per_node 8 launch/pretrain.py +recipe=phase1 tokenizer=/t \\\n    +trainer.max_step=5\n"
        "torchrun --nproc_per_node 8 launch/sft.py +recipe=sft_stage1 tokenizer=/t optim.schedule.shape=zigzag\n"
        "python launch/pretrain.py +recipe=phase1\n"
        "```\n"
    )
    found = commands([doc])
    assert [(c.line, c.gpu) for c in found] == [(2, True), (3, True), (5, True), (6, True)]
    with pytest.raises(ValueError, match="run.max_steps is now trainer.max_steps"):
        check("rl", script_and_overrides(found[0])[1])
    with pytest.raises(ValueError, match="unknown config key trainer.max_step: did you mean trainer.max_steps"):
        check("pretrain", script_and_overrides(found[1])[1])
    with pytest.raises(ValueError, match="optim.schedule.shape must be one of"):
        check("sft", script_and_overrides(found[2])[1])
    with pytest.raises(ValueError, match="tokenizer has no value: give tokenizer=..."):
        check("pretrain", script_and_overrides(found[3])[1])


def test_help_lists_only_the_groups_recipes_and_cpu_forms_that_apply():
    from step3vl_train.cli import usage

    pretrain, rl = usage("pretrain", "Pre-training."), usage("rl", "RL.")
    assert pretrain.startswith("Pre-training.") and rl.startswith("RL.")
    assert "  trainer " in pretrain and "  data " in pretrain and "  rollout " not in pretrain
    assert "  rollout    hf, vllm (default: hf)" in rl and "  data " not in rl
    assert "+recipe    phase1, phase2, pretrain, sft_stage1, sft_stage2 " in pretrain
    assert "+recipe    pacore, rlhf, rlvr " in rl
    assert "+cpu       pretrain, sft " in pretrain and "+cpu       pacore, rlhf, rlvr " in rl
    reward_model, service = usage("train_rm", "RM."), usage("serve_rm", "Service.")
    assert "+recipe    rm " in reward_model and "+cpu       rm " in reward_model and "  data " not in reward_model
    assert "  rm         genrm, scalar (default: scalar)" in service and "+recipe" not in service
