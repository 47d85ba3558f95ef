"""Writes a training checkpoint in the released format (config.json, safetensors, tokenizer), with the
processor the run trained with (processor_config.json, chat_template.jinja and their code).

python launch/export_hf.py checkpoint=outputs/run out=outputs/run_hf [dtype=bfloat16]

`checkpoint` is a run directory (its latest checkpoint) or one of its `checkpoints/step_N`. One process
suffices, whatever the world size the run trained with.
"""

import hydra
import torch
from omegaconf import DictConfig

from step3vl_train.train.export import export_checkpoint


@hydra.main(config_path="../configs", config_name="export", version_base="1.3")
def main(cfg: DictConfig) -> None:
    out = export_checkpoint(cfg.checkpoint, cfg.out, getattr(torch, cfg.dtype))
    print(f"exported {cfg.checkpoint} -> {out}")


if __name__ == "__main__":
    main()
