r"""RL stages on Ray: python rl/run.py stage=rlvr|rlhf [+recipe=rlvr|rlhf] [overrides].

python rl/run.py stage=rlvr +recipe=rlvr tokenizer=/models/sft policy.init_from=/models/sft \
    rollout=vllm trainer.num_gpus_per_rank=1 trainer.world_size=8 ray.address=auto
python rl/run.py stage=rlvr +cpu=rlvr policy.init_from=outputs/demo/sft2_hf prompts.root=outputs/demo/synthetic/rl \
    trainer.output_dir=outputs/demo/rlvr   # CPU: 2 gloo ranks, the transformers engine
python rl/run.py stage=rlhf +recipe=rlhf +cpu=rlhf policy.init_from=outputs/demo/rlvr_hf \
    prompts.root=outputs/demo/synthetic/rlhf reward.service.server.rm.scalar.model=outputs/demo/rm_hf \
    trainer.output_dir=outputs/demo/rlhf   # CPU: the reward-model service on loopback, in this run

Re-running the same command resumes from the run's last complete checkpoint. SIGTERM stops the run after
the iteration in flight, saved, with exit code 143 (docs/rl.md, "Stopping a run").
"""

import logging
import secrets
from pathlib import Path

import ray
from omegaconf import DictConfig, OmegaConf
from ray import serve

from rl.config import RENAMED_KEYS, RLConfig
from rl.driver import Driver, finished_step, save_config
from rl.preflight import check_resources, launched_service, preflight
from rl.rm_service.launch import start_service
from step3vl_train.cli import launch
from step3vl_train.train.run_lock import RunLock

logger = logging.getLogger("rl")


def train(cfg: DictConfig) -> None:
    raw = OmegaConf.to_container(cfg, resolve=True)
    config = RLConfig.from_dict(raw)
    with RunLock(config.trainer.output_dir):
        train_locked(config, raw)


def train_locked(config: RLConfig, raw: dict) -> None:
    raw["processor"] = config.processor  # policy.init_from's, as resolved: config.yaml and the workers carry it
    step = finished_step(config)
    if step is not None:
        save_config(Path(config.trainer.output_dir).resolve(), raw)
        logger.info("%s has already finished: step %d (of %d). Raise trainer.max_steps to go on.",
                    Path(config.trainer.output_dir).resolve(), step, config.trainer.max_steps)  # fmt: skip
        return
    preflight(config)
    service = launched_service(config) if config.reward.service.launch else None
    if config.ray.address:
        ray.init(address=config.ray.address)  # else a Ray instance of its own, never another one found running
    else:
        needed = config.trainer.world_size + config.rollout.num_engines + 1
        if service is not None:
            needed += int(service.replicas * service.replica_cpus + 0.999)
        ray.init(address="local", num_cpus=config.ray.num_cpus or needed, include_dashboard=False)
    try:
        check_resources(config, ray.cluster_resources())
        url = token = None
        if service is not None:
            token = secrets.token_urlsafe(32)  # this run's alone: it never leaves the process and the cluster
            url = start_service(service, config.reward.service.server, token)
        Driver(config, raw, url, token).run()
    finally:
        if service is not None:
            serve.shutdown()
        ray.shutdown()


if __name__ == "__main__":
    launch(train, "rl", __doc__, renamed=RENAMED_KEYS)
