"""The RL config as `rl/run.py` composes it, for tests that need it in-process."""

from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from rl.config import RLConfig
from step3vl_train.train.recipes import register_recipes
from tests.conftest import REPO

register_recipes()


def compose_rl(*overrides) -> RLConfig:
    with initialize_config_dir(str(REPO / "configs"), version_base="1.3"):
        cfg = compose("rl", ["tokenizer=tiny", *overrides])
    return RLConfig.from_dict(OmegaConf.to_container(cfg, resolve=True))
