"""Pre-training on DeepSpeed ZeRO-3.

torchrun --nproc_per_node 8 launch/pretrain.py +recipe=phase1 tokenizer=/models/step3vl data.root=/data/pretrain
torchrun --nproc_per_node 2 launch/pretrain.py +recipe=phase1 model=tiny processor=tiny tokenizer=tiny \
    data.root=outputs/synthetic/pretrain \
    trainer.max_steps=20 trainer.output_dir=outputs/pretrain_tiny   # CPU, gloo

Re-running the same command resumes from the run's last complete checkpoint.
"""

import hydra
from omegaconf import DictConfig

from step3vl_train.train.recipes import register_recipes
from step3vl_train.train.trainer import Trainer


@hydra.main(config_path="../configs", config_name="pretrain", version_base="1.3")
def main(cfg: DictConfig) -> None:
    trainer = Trainer(cfg)
    try:
        trainer.run()
    finally:
        trainer.close()


if __name__ == "__main__":
    register_recipes()
    main()
