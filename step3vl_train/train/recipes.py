"""`+recipe=NAME` selects `recipes/NAME.yaml`: each file is registered in Hydra's ConfigStore as group
`recipe`, applied at the top level of the config."""

from __future__ import annotations

from pathlib import Path

from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf

RECIPES = Path(__file__).resolve().parents[2] / "recipes"


def register_recipes(directory: Path = RECIPES) -> list[str]:
    store = ConfigStore.instance()
    names = []
    for path in sorted(directory.glob("*.yaml")):
        store.store(group="recipe", name=path.stem, node=OmegaConf.load(path), package="_global_")
        names.append(path.stem)
    return names
