"""A run in phases: their order and checks, the learning rate across them, and where a run may start."""

import pytest
import torch

from step3vl_train.data.config import SourceConfig
from step3vl_train.train.checkpoint import Checkpointer
from step3vl_train.train.config import DecayConfig, PhaseConfig, ScheduleConfig, TrainerConfig
from step3vl_train.train.phases import phase_at, run_phases, schedule_legs
from step3vl_train.train.schedule import lr_factor
from step3vl_train.train.trainer import starting_checkpoint
from step3vl_train.usage import UsageError

SOURCES = [SourceConfig("text", ["t"], weight=0.6), SourceConfig("caption", ["c"], weight=0.4)]


def two_phases(**phase2):
    return {"phase2": PhaseConfig(**{"start_tokens": 900, "weights": {"text": 1.0}, **phase2})}


def test_a_phase_without_weights_keeps_the_mixture_and_changes_the_learning_rate():
    phases = run_phases(SOURCES, {"cooldown": PhaseConfig(500)})
    assert phases[1].weights == phases[0].weights == {"text": 0.6, "caption": 0.4}


def test_phases_in_order_with_every_source_weighed():
    phases = run_phases(SOURCES, {"late": PhaseConfig(1500, {"caption": 1.0}), **two_phases()})
    assert [(p.name, p.start_tokens) for p in phases] == [("first", 0), ("phase2", 900), ("late", 1500)]
    assert phases[1].weights == {"text": 1.0, "caption": 0.0}  # left out: not read in that phase
    assert [phase_at(phases, tokens) for tokens in (0, 899, 900, 1499, 10**12)] == [0, 0, 1, 1, 2]


@pytest.mark.parametrize(
    ("phase2", "match"),
    [
        ({"weights": {"ocr": 1.0}}, r"names \['ocr'\], which are not data sources.*~phases.phase2"),
        ({"weights": {"text": 0.0}}, "needs a positive weight"),
        ({"weights": {"text": -1.0, "caption": 2.0}}, "none negative"),
        ({"start_tokens": 0}, "start_tokens must be positive"),
    ],
)
def test_bad_phases_are_refused_by_name(phase2, match):
    with pytest.raises(UsageError, match=match):
        run_phases(SOURCES, two_phases(**phase2))


def test_the_learning_rate_carries_on_across_the_phases():
    """Phase 1: warmup, then linear 1 -> 0.2 at 900; phase 2 takes 0.2 on down to 0.12 at 1,200 (spec 5.1)."""
    first = ScheduleConfig(shape="linear", warmup_tokens=100, decay_tokens=900, min_lr_ratio=0.2)
    legs = schedule_legs(run_phases(SOURCES, two_phases(schedule=DecayConfig("linear", 1200, 0.12))))
    assert lr_factor(50, first, phases=legs) == pytest.approx(0.5)
    assert lr_factor(899, first, phases=legs) == pytest.approx(0.2, abs=1e-3)
    assert lr_factor(900, first, phases=legs) == pytest.approx(0.2)  # no jump at the switch
    assert lr_factor(1050, first, phases=legs) == pytest.approx(0.16)
    assert lr_factor(5000, first, phases=legs) == pytest.approx(0.12)
    # a cosine leg from where a constant first phase left it
    cosine = schedule_legs(run_phases(SOURCES, two_phases(schedule=DecayConfig("cosine", 1100, 0.0))))
    assert lr_factor(1000, ScheduleConfig(shape="constant"), phases=cosine) == pytest.approx(0.5)


def checkpoint(run_dir, tokens):
    """A stand-in for a checkpoint a run has published, as far as a start looks into it."""
    step = run_dir / "checkpoints" / "step_5"
    step.mkdir(parents=True)
    torch.save({"progress": {"step": 5, "tokens": tokens}}, step / "trainer_rank0.pt")
    (run_dir / "checkpoints" / "latest").write_text("step_5")
    return run_dir


def start(tmp_path, **trainer):
    phases = run_phases(SOURCES, two_phases())
    return starting_checkpoint(Checkpointer(tmp_path / "own", 3), TrainerConfig(**trainer), phases)


def test_a_run_starts_from_its_own_checkpoint_then_continue_from(tmp_path):
    phase1 = checkpoint(tmp_path / "phase1", tokens=950)
    assert start(tmp_path, continue_from=str(phase1), start_phase="phase2").root == phase1 / "checkpoints"
    checkpoint(tmp_path / "own", tokens=1000)
    assert start(tmp_path, continue_from=str(phase1)).root == tmp_path / "own" / "checkpoints"


@pytest.mark.parametrize(
    ("trainer", "match"),
    [
        ({"start_phase": "phase2"}, "set trainer.continue_from to that run's directory"),
        ({"start_phase": "phase2", "init_from": "/export"}, "with trainer.fresh_optimizer=true"),
        ({"start_phase": "phase3", "fresh_optimizer": True, "init_from": "/e"}, "not one of the later phases"),
        ({"requires_init_from": True}, "or trainer.from_scratch=true"),
        ({"continue_from": "{empty}"}, "has no checkpoint to continue"),
        ({"continue_from": "{early}", "start_phase": "phase2"}, "trained 500 tokens and phase phase2 starts at 900"),
    ],
)  # fmt: skip
def test_a_start_the_recipe_rules_out_is_refused(tmp_path, trainer, match):
    early = checkpoint(tmp_path / "early", tokens=500)
    trainer = {key: value.format(empty=tmp_path / "empty", early=early) if isinstance(value, str) else value
               for key, value in trainer.items()}  # fmt: skip
    with pytest.raises(UsageError, match=match):
        start(tmp_path, **trainer)


def test_starts_the_recipe_allows(tmp_path):
    assert start(tmp_path, requires_init_from=True, from_scratch=True) is None
    assert start(tmp_path, requires_init_from=True, init_from="/export") is None
    assert start(tmp_path, start_phase="phase2", fresh_optimizer=True, init_from="/export") is None
