r"""RL stages on Ray: python rl/run.py stage=rlvr [+recipe=rlvr] [overrides].

python rl/run.py stage=rlvr +recipe=rlvr tokenizer=/models/sft policy.init_from=/models/sft \
    rollout=vllm trainer.num_gpus_per_rank=1 trainer.world_size=8 ray.address=auto
python rl/run.py stage=rlvr +cpu=rlvr policy.init_from=outputs/demo/sft2_hf prompts.root=outputs/demo/synthetic/rl \
    trainer.output_dir=outputs/demo/rlvr   # CPU: 2 gloo ranks, the transformers engine

Re-running the same command resumes from the run's last complete checkpoint.
"""

import ray
from omegaconf import DictConfig, OmegaConf

from rl.config import RENAMED_KEYS, RLConfig
from rl.driver import Driver
from rl.preflight import preflight
from step3vl_train.cli import launch


def train(cfg: DictConfig) -> None:
    raw = OmegaConf.to_container(cfg, resolve=True)
    config = RLConfig.from_dict(raw)
    if config.ray.address:
        ray.init(address=config.ray.address)
    else:
        needed = config.trainer.world_size + config.rollout.num_engines + 1
        ray.init(num_cpus=config.ray.num_cpus or needed, include_dashboard=False)
    try:
        preflight(config, ray.cluster_resources())
        Driver(config, raw).run()
    finally:
        ray.shutdown()


if __name__ == "__main__":
    launch(train, "rl", __doc__, renamed=RENAMED_KEYS)
