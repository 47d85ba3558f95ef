import pytest
import torch

from step3vl_train.train.config import OptimConfig, ParamGroupConfig, ScheduleConfig
from step3vl_train.train.optim import ParamGroupError, build_optimizer, build_param_groups


def groups(*specs, **optim):
    return OptimConfig(param_groups=[ParamGroupConfig(*spec) for spec in specs], **optim)


def test_first_matching_group_claims_and_unset_fields_inherit(tiny_model):
    cfg = groups(
        ("no_decay", r"(\.bias$|norm|ln_|positional_embedding)", None, 0.0),
        ("vision", r"^vision_model\.", 1e-5),
        ("rest", r".*"),
        lr=3e-4,
        weight_decay=0.1,
        schedule=ScheduleConfig(warmup_tokens=100),
    )
    built = {g.name: g for g in build_param_groups(tiny_model, cfg)}
    assert "vision_model.ln_pre.weight" in built["no_decay"].names  # first match wins
    assert "vision_model.conv1.weight" in built["vision"].names
    assert "lm_head.weight" in built["rest"].names
    assert (built["no_decay"].lr, built["no_decay"].weight_decay) == (3e-4, 0.0)
    assert (built["vision"].lr, built["vision"].weight_decay, built["vision"].warmup_tokens) == (1e-5, 0.1, 100)
    trainable = sum(p.requires_grad for p in tiny_model.parameters())
    assert sum(len(g.params) for g in built.values()) == trainable
    optimizer = build_optimizer(list(built.values()), cfg)
    assert [g["name"] for g in optimizer.param_groups] == ["no_decay", "vision", "rest"]
    assert optimizer.param_groups[1]["peak_lr"] == 1e-5 and optimizer.defaults["betas"] == (0.9, 0.95)


def test_a_pattern_that_claims_nothing_is_an_error(tiny_model):
    with pytest.raises(ParamGroupError, match=r"\['typo'\] claim no trainable parameter"):
        build_param_groups(tiny_model, groups(("typo", r"^visoin_model\."), ("rest", ".*")))


def test_an_unclaimed_trainable_parameter_is_an_error(tiny_model):
    with pytest.raises(ParamGroupError, match="no group claims"):
        build_param_groups(tiny_model, groups(("vision", r"^vision_model\.")))


def test_frozen_parameters_need_no_group(tiny_model):
    for param in tiny_model.model.parameters():
        param.requires_grad_(False)
    tiny_model.lm_head.requires_grad_(False)
    built = build_param_groups(tiny_model, groups(("vision", r"^(vision_model|vit_large_projector)\.")))
    assert all(n.startswith(("vision_model.", "vit_large_projector.")) for n in built[0].names)
    assert isinstance(build_optimizer(built, OptimConfig()), torch.optim.AdamW)


def test_the_shipped_optimizer_config_covers_the_model(tiny_model):
    from omegaconf import OmegaConf

    from tests.conftest import REPO

    loaded = OmegaConf.load(REPO / "configs" / "optim" / "adamw.yaml")
    cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(OptimConfig), loaded))
    built = {g.name: g for g in build_param_groups(tiny_model, cfg)}
    assert built["no_decay"].weight_decay == 0.0 and built["default"].weight_decay == 0.01
    assert "model.norm.weight" in built["no_decay"].names
    assert "vision_model.transformer.resblocks.0.ln_1.bias" in built["no_decay"].names
    assert "model.layers.0.self_attn.q_proj.weight" in built["default"].names
    assert "vision_model.transformer.resblocks.0.attn.in_proj_bias" in built["no_decay"].names
    assert "vision_model.transformer.resblocks.0.ls_1.gamma" in built["no_decay"].names
    assert not any(name.endswith(("bias", "gamma", "norm.weight")) for name in built["default"].names)
