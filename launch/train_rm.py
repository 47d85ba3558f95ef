r"""A scalar reward model on DeepSpeed ZeRO-3: Bradley-Terry on preference pairs, held-out accuracy, and an
export the reward-model service loads (its value head and reward_stats.json).

torchrun --nproc_per_node 8 launch/train_rm.py +recipe=rm tokenizer=/models/step3vl trainer.init_from=/runs/sft2_hf \
    data.root=/data/preference
torchrun --nproc_per_node 2 launch/train_rm.py +recipe=rm +cpu=rm data.root=outputs/demo/synthetic/preference \
    trainer.init_from=outputs/demo/sft2_hf trainer.output_dir=outputs/demo/rm   # CPU, gloo
python launch/export_hf.py checkpoint=outputs/demo/rm out=outputs/demo/rm_hf

Preference pairs are samples with `messages` ending with a user turn, `chosen` and `rejected`
(docs/data.md); only the final answer of each reply (after its last `</think>`) is scored. Re-running the
same command resumes from the run's last complete checkpoint.
"""

from omegaconf import DictConfig

from step3vl_train.cli import launch


def train(cfg: DictConfig) -> None:
    from step3vl_train.train.reward_trainer import RewardModelTrainer  # here: --help need not wait for DeepSpeed

    trainer = RewardModelTrainer(cfg)
    try:
        trainer.run()
    finally:
        trainer.close()


if __name__ == "__main__":
    launch(train, "train_rm", __doc__)
