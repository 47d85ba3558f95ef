import os

import pytest
from omegaconf import OmegaConf
from omegaconf.errors import ConfigKeyError, MissingMandatoryValue

from step3vl_train.data.config import AUTO_WORKERS_CAP, DataConfig, loader_workers
from tests.conftest import REPO


def config(**overrides):
    return DataConfig.from_dict({"sources": [{"name": "a", "paths": ["a/*.tar"]}], **overrides})


def test_recipes_and_defaults_load():
    for recipe in ("pretrain", "sft_stage1", "sft_stage2"):
        cfg = DataConfig.from_dict(OmegaConf.load(REPO / "recipes" / f"{recipe}.yaml").data)
        assert cfg.sources and cfg.packing.seq_len in (4096, 131072)
    stage1 = DataConfig.from_dict(OmegaConf.load(REPO / "recipes" / "sft_stage1.yaml").data)
    text = sum(s.weight for s in stage1.sources if s.name == "text")
    assert text / sum(s.weight for s in stage1.sources) == pytest.approx(0.9)
    default = OmegaConf.load(REPO / "configs" / "data" / "default.yaml")
    merged = OmegaConf.merge(default, {"sources": [{"name": "x", "paths": ["x"]}]})
    assert DataConfig.from_dict(merged).num_workers == "auto"


def test_auto_workers_are_the_cpus_a_rank_has_less_its_own(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda _pid: set(range(64)))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    assert loader_workers("auto") == 7 and loader_workers(3) == 3
    assert loader_workers("auto", cpu_share=8) == AUTO_WORKERS_CAP  # a sequence-parallel group's reader
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    monkeypatch.setattr(os, "sched_getaffinity", lambda _pid: {0, 1})
    assert loader_workers("auto") == 1  # at least one
    with pytest.raises(ValueError, match="num_workers"):
        config(num_workers="many")


@pytest.mark.parametrize(
    ("overrides", "error", "match"),
    [
        ({"packing": {"seq_lenn": 5}}, ConfigKeyError, "seq_lenn"),
        ({"sources": [{"name": "a"}]}, MissingMandatoryValue, "paths"),
        ({"sources": [{"name": "a", "paths": ["x"], "kind": "parquet"}]}, ValueError, "kind"),
        ({"sources": [{"name": "a", "paths": ["x"], "weight": 0}]}, ValueError, "weight"),
        ({"sources": [{"name": "a", "paths": ["x"]}, {"name": "a", "paths": ["y"]}]}, ValueError, "repeated"),
        ({"sources": []}, ValueError, "empty"),
        ({"packing": {"overflow": "split"}}, ValueError, "overflow"),
    ],
)
def test_bad_configs_name_the_field(overrides, error, match):
    with pytest.raises(error, match=match):
        config(**overrides)


def test_train_shards_replace_the_recipes_mixture():
    recipe = OmegaConf.load(REPO / "recipes" / "pretrain.yaml").data
    cfg = DataConfig.from_dict(OmegaConf.merge(recipe, {"train": "/data/mine/shard-{000000..000009}.tar"}))
    assert [(s.name, s.paths) for s in cfg.sources] == [("train", ["/data/mine/shard-{000000..000009}.tar"])]
    assert cfg.packing.seq_len == 4096  # the recipe's packing stays
