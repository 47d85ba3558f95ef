"""Pre-training's starting point: a PE-lang vision tower and a Qwen3 decoder in one released-format
model, with a freshly initialised projector. Phase 1 starts from it with `trainer.init_from=OUT`.

python launch/assemble_init.py qwen3=/models/Qwen3-8B pe=/models/PE-Lang-G14-448.pt out=/models/step3vl_init
"""

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

from step3vl_train.model import Step3VLConfig, Step3VLForConditionalGeneration
from step3vl_train.model.parts import load_decoder_from_qwen3, load_vision_from_pe


@hydra.main(config_path="../configs", config_name="assemble_init", version_base="1.3")
def main(cfg: DictConfig) -> None:
    torch.manual_seed(cfg.seed)
    config = Step3VLConfig.from_dict(OmegaConf.to_container(cfg.model, resolve=True))
    model = Step3VLForConditionalGeneration(config).to(getattr(torch, cfg.dtype))
    load_decoder_from_qwen3(model, cfg.qwen3)
    load_vision_from_pe(model, cfg.pe)
    model.save_pretrained(cfg.out)
    print(f"assembled {cfg.pe} + {cfg.qwen3} -> {cfg.out}")


if __name__ == "__main__":
    main()
