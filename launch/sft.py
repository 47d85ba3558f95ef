r"""Supervised fine-tuning on DeepSpeed ZeRO-3 (the pre-training loop, with the SFT recipes' data and schedule).

torchrun --nproc_per_node 8 launch/sft.py +recipe=sft_stage1 tokenizer=/models/step3vl trainer.init_from=/runs/phase2_hf
torchrun --nproc_per_node 2 launch/sft.py +recipe=sft_stage1 +cpu=sft data.root=outputs/demo/synthetic/sft \
    trainer.init_from=outputs/demo/pretrain_hf trainer.output_dir=outputs/demo/sft   # CPU, gloo: 2 ranks share each row

The recipes share each 128K row over the 8 ranks of a node (`trainer.sequence_parallel: 8`); set it to
a divisor of the number of ranks elsewhere (launch/estimate_memory.py says what fits).
"""

from omegaconf import DictConfig

from step3vl_train.cli import launch


def train(cfg: DictConfig) -> None:
    from step3vl_train.train.trainer import Trainer  # here: --help need not wait for DeepSpeed

    trainer = Trainer(cfg)
    try:
        trainer.run()
    finally:
        trainer.close()


if __name__ == "__main__":
    launch(train, "sft", __doc__)
