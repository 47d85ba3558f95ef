"""Every recipe composes with Hydra on the CPU, carries the paper's numbers, and switches to the tiny model."""

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from step3vl_train.data.config import DataConfig
from step3vl_train.model import Step3VLConfig
from step3vl_train.train.config import OptimConfig, TrainerConfig, TrainJobConfig
from step3vl_train.train.phases import run_phases, schedule_legs
from step3vl_train.train.recipes import register_recipes
from step3vl_train.train.schedule import lr_factor
from step3vl_train.usage import build
from tests.conftest import REPO

register_recipes()


def composed(config, recipe, *overrides):
    with initialize_config_dir(str(REPO / "configs"), version_base="1.3"):
        cfg = compose(config, [f"+recipe={recipe}", "tokenizer=tiny", *overrides])
    return cfg, OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(OptimConfig), cfg.optim))


@pytest.mark.parametrize(
    ("recipe", "max_tokens"), [("pretrain", 1.2e12), ("phase1", 900e9), ("phase2", 1.2e12)]
)  # fmt: skip
def test_pretraining_is_one_schedule_in_two_phases(recipe, max_tokens):
    """5e-5 -> 1e-5 over the first 900B tokens, then 1e-5 -> 6e-6 over the last 300B, the mixture switching at
    900B; phase1 and phase2 are that run's two halves."""
    cfg, optim = composed("pretrain", recipe)
    job = build(TrainJobConfig, cfg)
    phases = run_phases(DataConfig.from_dict(cfg.data).sources, job.phases)
    legs = schedule_legs(phases)

    def lr(tokens):
        return optim.lr * lr_factor(int(tokens), optim.schedule, phases=legs)

    assert lr(4.5e9) == pytest.approx(5e-5) and lr(900e9) == pytest.approx(1e-5) and lr(1.2e12) == pytest.approx(6e-6)
    assert lr(1.05e12) == pytest.approx(8e-6)  # half way down phase 2's leg
    assert [phase.name for phase in phases] == ["first", "phase2"] and phases[1].start_tokens == 900e9
    assert sum(phases[1].weights.values()) == pytest.approx(1.0) and phases[1].weights["ocr"] > phases[0].weights["ocr"]
    assert job.trainer.max_tokens == max_tokens and job.trainer.requires_init_from
    assert job.trainer.start_phase == ("phase2" if recipe == "phase2" else None)
    assert tuple(optim.betas) == (0.9, 0.95) and optim.eps == 1e-8 and optim.weight_decay == 0.01
    assert DataConfig.from_dict(cfg.data).packing.seq_len == 4096


@pytest.mark.parametrize(("recipe", "tokens"), [("sft_stage1", 190e9), ("sft_stage2", 36e9)])
def test_sft_recipes_carry_the_papers_numbers(recipe, tokens):
    cfg, optim = composed("sft", recipe)
    assert optim.lr == 1e-4 and optim.lr * optim.schedule.min_lr_ratio == pytest.approx(1e-5)
    assert tuple(optim.betas) == (0.9, 0.95) and optim.eps == 1e-8 and optim.weight_decay == 0.01
    trainer = TrainerConfig(**cfg.trainer)
    assert trainer.max_tokens == tokens == optim.schedule.decay_tokens and trainer.requires_init_from
    assert DataConfig.from_dict(cfg.data).packing.seq_len == 131072
    assert Step3VLConfig.from_dict(OmegaConf.to_container(cfg.model, resolve=True)).text_config.hidden_size == 4096


def test_the_cpu_variant_is_one_override_away():
    cfg, _ = composed("pretrain", "phase1", "model=tiny", "processor=tiny")
    assert cfg.model.text_config.hidden_size == 64 and cfg.processor.image_size == 224
    assert cfg.optim.lr == 5e-5  # the recipe's numbers stay
