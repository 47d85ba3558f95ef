r"""Pre-training on DeepSpeed ZeRO-3.

torchrun --nproc_per_node 8 launch/pretrain.py +recipe=phase1 tokenizer=/models/step3vl data.root=/data/pretrain
torchrun --nproc_per_node 2 launch/pretrain.py +recipe=phase1 +cpu=pretrain data.root=outputs/demo/synthetic/pretrain \
    trainer.output_dir=outputs/demo/pretrain   # CPU, gloo

Re-running the same command resumes from the run's last complete checkpoint.
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
    launch(train, "pretrain", __doc__)
