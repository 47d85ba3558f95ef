"""A resume with a changed config: each changed key is applied and logged, or refused by name."""

import pytest
from omegaconf import OmegaConf

from step3vl_train.model import Step3VLConfig
from step3vl_train.train.checkpoint import Checkpointer
from step3vl_train.train.config import OptimConfig
from step3vl_train.train.config_changes import changes_since_checkpoint
from step3vl_train.train.distributed import close_distributed, free_port, init_distributed
from step3vl_train.train.engine import build_engine, deepspeed_config
from step3vl_train.train.optim import apply_hyperparameters
from step3vl_train.usage import UsageError
from tests.conftest import REPO

SAVED = {
    "optim": {"lr": 1e-3, "weight_decay": 0.1, "betas": [0.9, 0.95], "schedule": {"warmup_tokens": 100},
              "param_groups": [{"name": "all", "pattern": ".*", "lr": None}]},
    "trainer": {"grad_clip": 1.0, "max_steps": 10, "sequence_parallel": 1},
    "deepspeed": {"zero_optimization": {"stage": 3}},
    "data": {"seed": 0, "packing": {"seq_len": 512}, "sources": [{"name": "text", "weight": 1.0}]},
    "phases": {"phase2": {"start_tokens": 500, "weights": {"text": 1.0}}, "phase3": {"start_tokens": 900}},
}  # fmt: skip


def changed(**edits):
    config = OmegaConf.create(SAVED)
    for key, value in edits.items():
        OmegaConf.update(config, key.replace("__", "."), value)
    return OmegaConf.to_container(config)


def test_optimizer_settings_clipping_and_length_are_applied_and_listed():
    current = changed(
        optim__lr=5e-4, optim__weight_decay=0.0, optim__betas=[0.8, 0.9], optim__schedule__warmup_tokens=0,
        trainer__grad_clip=2.0, trainer__max_steps=20,
        optim__param_groups=[{"name": "all", "pattern": ".*", "lr": 1e-4}],
    )  # fmt: skip
    assert changes_since_checkpoint(SAVED, current, tokens=600) == [
        "optim.betas.0: 0.9 -> 0.8", "optim.betas.1: 0.95 -> 0.9", "optim.lr: 0.001 -> 0.0005",
        "optim.param_groups.0.lr: None -> 0.0001", "optim.schedule.warmup_tokens: 100 -> 0",
        "optim.weight_decay: 0.1 -> 0.0", "trainer.grad_clip: 1.0 -> 2.0", "trainer.max_steps: 10 -> 20",
    ]  # fmt: skip
    assert changes_since_checkpoint(SAVED, changed(), tokens=600) == []


def test_the_data_stream_the_groups_and_a_begun_phase_are_refused_by_name():
    current = changed(
        optim__lr=5e-4, data__seed=1, data__packing__seq_len=1024, trainer__sequence_parallel=2,
        optim__param_groups=[{"name": "every", "pattern": ".*", "lr": None}], phases__phase2__weights__text=0.5,
        deepspeed__zero_optimization__stage=2,
    )  # fmt: skip
    with pytest.raises(UsageError) as refused:
        changes_since_checkpoint(SAVED, current, tokens=600)
    message = str(refused.value)
    for key in ("data.seed", "data.packing.seq_len", "trainer.sequence_parallel", "optim.param_groups.0.name",
                "phases.phase2.weights.text", "deepspeed.zero_optimization.stage"):  # fmt: skip
        assert key in message
    assert "optim.lr" not in message  # applied, not refused
    # a phase not yet begun may change; so may one a run moves later than where it stands
    assert changes_since_checkpoint(SAVED, changed(phases__phase3__start_tokens=950), tokens=600) == [
        "phases.phase3.start_tokens: 900 -> 950"
    ]
    with pytest.raises(UsageError, match="phases.phase3.start_tokens"):
        changes_since_checkpoint(SAVED, changed(phases__phase3__start_tokens=550), tokens=600)


@pytest.fixture
def one_rank(monkeypatch):
    environment = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1"}
    for name, value in {**environment, "MASTER_PORT": str(free_port())}.items():
        monkeypatch.setenv(name, value)
    init_distributed()
    yield
    close_distributed()


def test_deepspeed_restores_the_saved_settings_and_the_current_ones_are_written_over(tmp_path, one_rank):
    """The reason for `apply_hyperparameters`: DeepSpeed's load brings back the groups' saved lr and decay."""
    model = Step3VLConfig.from_dict(OmegaConf.to_container(OmegaConf.load(REPO / "configs/model/tiny.yaml")))
    base = OmegaConf.to_container(OmegaConf.load(REPO / "configs/deepspeed/zero3.yaml"))
    ds_config = deepspeed_config(base, 1, 1, 1.0, bf16=False)
    checkpointer = Checkpointer(tmp_path, keep_last=1)
    saved = build_engine(model, OptimConfig(lr=1e-3, weight_decay=0.1), ds_config)
    checkpointer.save(saved.engine, 1, {})
    current = OptimConfig(lr=5e-4, weight_decay=0.0, betas=(0.8, 0.9))
    resumed = build_engine(model, current, ds_config)
    checkpointer.load(resumed.engine)
    (group,) = resumed.engine.optimizer.param_groups
    assert (group["peak_lr"], group["weight_decay"]) == (1e-3, 0.1)
    apply_hyperparameters(resumed.engine.optimizer, current)
    assert (group["peak_lr"], group["weight_decay"], group["betas"]) == (5e-4, 0.0, (0.8, 0.9))
