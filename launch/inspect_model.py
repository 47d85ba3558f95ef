"""Prints a model preset's parameter counts and every tensor's shape, built on the meta device.

python launch/inspect_model.py model=step3vl_10b [+out=FILE]
"""

import json
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from step3vl_train.model import Step3VLConfig
from step3vl_train.model.counting import build_on_meta, count_parameters


@hydra.main(config_path="../configs", config_name="inspect_model", version_base="1.3")
def main(cfg: DictConfig) -> None:
    model = build_on_meta(Step3VLConfig.from_dict(OmegaConf.to_container(cfg.model, resolve=True)))
    report = {
        "parameters": count_parameters(model),
        "tensors": {name: list(tensor.shape) for name, tensor in model.state_dict().items()},
    }
    text = json.dumps(report, indent=1)
    if cfg.get("out"):
        Path(cfg.out).write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
