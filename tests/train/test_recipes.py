"""Every recipe composes with Hydra on the CPU, carries the paper's numbers, and switches to the tiny model."""

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from step3vl_train.data.config import DataConfig
from step3vl_train.model import Step3VLConfig
from step3vl_train.train.config import OptimConfig, TrainerConfig
from step3vl_train.train.recipes import register_recipes
from tests.conftest import REPO

register_recipes()


def composed(config, recipe, *overrides):
    with initialize_config_dir(str(REPO / "configs"), version_base="1.3"):
        cfg = compose(config, [f"+recipe={recipe}", "tokenizer=tiny", *overrides])
    return cfg, OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(OptimConfig), cfg.optim))


@pytest.mark.parametrize(
    ("config", "recipe", "lr", "floor", "tokens", "seq_len"),
    [
        ("pretrain", "phase1", 5e-5, 1e-5, 900e9, 4096),
        ("pretrain", "phase2", 1e-5, 6e-6, 300e9, 4096),
        ("sft", "sft_stage1", 1e-4, 1e-5, 190e9, 131072),
        ("sft", "sft_stage2", 1e-4, 1e-5, 36e9, 131072),
    ],
)
def test_recipes_carry_the_papers_numbers(config, recipe, lr, floor, tokens, seq_len):
    cfg, optim = composed(config, recipe)
    assert optim.lr == lr and optim.lr * optim.schedule.min_lr_ratio == pytest.approx(floor)
    assert tuple(optim.betas) == (0.9, 0.95) and optim.eps == 1e-8 and optim.weight_decay == 0.01
    trainer = TrainerConfig(**cfg.trainer)
    assert trainer.max_tokens == tokens == optim.schedule.decay_tokens
    assert DataConfig.from_dict(cfg.data).packing.seq_len == seq_len
    assert Step3VLConfig.from_dict(OmegaConf.to_container(cfg.model, resolve=True)).text_config.hidden_size == 4096


def test_the_cpu_variant_is_one_override_away():
    cfg, _ = composed("pretrain", "phase1", "model=tiny", "processor=tiny")
    assert cfg.model.text_config.hidden_size == 64 and cfg.processor.image_size == 224
    assert cfg.optim.lr == 5e-5  # the recipe's numbers stay


@pytest.mark.parametrize(("config", "recipe"), [("pretrain", "phase2"), ("sft", "sft_stage1"), ("sft", "sft_stage2")])
def test_later_stages_require_what_they_start_from(config, recipe):
    cfg, _ = composed(config, recipe)
    assert TrainerConfig(**cfg.trainer).requires_init_from
    assert not TrainerConfig(**composed("pretrain", "phase1")[0].trainer).requires_init_from
