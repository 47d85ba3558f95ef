"""RL stages on Ray: python rl/run.py stage=rlvr [+recipe=rlvr] [overrides].

python rl/run.py stage=rlvr +recipe=rlvr tokenizer=/models/sft policy.init_from=/models/sft \
    rollout=vllm run.num_gpus_per_rank=1 run.world_size=8 ray.address=auto
python rl/run.py stage=rlvr model=tiny processor=tiny tokenizer=tiny policy.init_from=outputs/demo/sft_hf \
    run.max_steps=20 run.output_dir=outputs/rl_tiny   # CPU: 2 gloo ranks, the transformers engine

Re-running the same command resumes from the run's last complete checkpoint.
"""

import sys

import hydra
import ray
from omegaconf import DictConfig, OmegaConf

from rl.config import RLConfig
from rl.driver import Driver
from rl.preflight import PreflightError, preflight
from step3vl_train.train.recipes import register_recipes

register_recipes()


@hydra.main(config_path="../configs", config_name="rl", version_base="1.3")
def main(cfg: DictConfig) -> None:
    raw = OmegaConf.to_container(cfg, resolve=True)
    config = RLConfig.from_dict(raw)
    if config.ray.address:
        ray.init(address=config.ray.address)
    else:
        needed = config.run.world_size + config.rollout.num_engines + 1
        ray.init(num_cpus=config.ray.num_cpus or needed, include_dashboard=False)
    try:
        preflight(config, ray.cluster_resources())
        Driver(config, raw).run()
    except PreflightError as error:
        sys.exit(f"rl/run.py: {error}")
    finally:
        ray.shutdown()


if __name__ == "__main__":
    main()
