"""Supervised fine-tuning on DeepSpeed ZeRO-3 (the pre-training loop, with the SFT recipes' data and schedule).

torchrun --nproc_per_node 8 launch/sft.py +recipe=sft_stage1 tokenizer=/models/step3vl trainer.init_from=/runs/phase2_hf
torchrun --nproc_per_node 2 launch/sft.py +recipe=sft_stage1 model=tiny processor=tiny tokenizer=tiny \
    data.root=outputs/synthetic/sft data.packing.seq_len=4096 trainer.sequence_parallel=2 trainer.grad_accum=1 \
    trainer.requires_init_from=false trainer.max_steps=20   # CPU, gloo: both ranks share each row

The recipes share each 128K row over the 8 ranks of a node (`trainer.sequence_parallel: 8`); set it to
a divisor of the number of ranks elsewhere (launch/estimate_memory.py says what fits).
"""

import hydra
from omegaconf import DictConfig

from step3vl_train.train.recipes import register_recipes
from step3vl_train.train.trainer import Trainer


@hydra.main(config_path="../configs", config_name="sft", version_base="1.3")
def main(cfg: DictConfig) -> None:
    trainer = Trainer(cfg)
    try:
        trainer.run()
    finally:
        trainer.close()


if __name__ == "__main__":
    register_recipes()
    main()
