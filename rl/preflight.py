"""An RL config checked against the disk (before Ray starts) and the cluster before any actor starts. Each
mistake is one message naming the problem and the fix; none surfaces later as an actor's crash, which the
driver would retry as if it were transient."""

from __future__ import annotations

from pathlib import Path

import requests
from omegaconf import OmegaConf

from rl.config import RLConfig
from rl.engines.fused import check_whole_modules
from rl.rewards.rm_client import read_client_token
from rl.rm_service.config import ServiceConfig
from step3vl_train.data.files import check_source_files
from step3vl_train.model.checkpoint import CONFIG_NAME, INDEX_NAME, SINGLE_FILE_NAME
from step3vl_train.train.checkpoint import Checkpointer
from step3vl_train.usage import UsageError


class PreflightError(UsageError):
    """The run cannot start as configured."""


def check_model_directory(path: str | None, key: str) -> None:
    """`path` holds a model in the released layout: `config.json` and its safetensors."""
    layout = "a released-format model directory (launch/export_hf.py writes one; StepFun's release is one)"
    if not path:
        raise PreflightError(f"{key} is not set. It must be {layout}.")
    directory = Path(path)
    if not directory.is_dir():
        raise PreflightError(f"{key}={path}: no such directory. It must be {layout}.")
    if not (directory / CONFIG_NAME).is_file():
        raise PreflightError(f"{key}={path}: no {CONFIG_NAME} in it. It must be {layout}.")
    if not any((directory / name).is_file() for name in (INDEX_NAME, SINGLE_FILE_NAME)):
        raise PreflightError(f"{key}={path}: no {INDEX_NAME} or {SINGLE_FILE_NAME} in it. It must be {layout}.")


def check_weights(cfg: RLConfig) -> None:
    """Where the policy, the critic and the vLLM engine start from."""
    if not cfg.policy.init_from and not cfg.policy.from_scratch:
        raise PreflightError(
            "policy.init_from is not set. RL starts from a trained model: set it to an SFT export "
            "(launch/export_hf.py) or a released-format directory, or set policy.from_scratch=true to train a "
            "randomly initialised policy."
        )
    if cfg.rollout.engine == "vllm" and not (cfg.rollout.model or cfg.policy.init_from):
        raise PreflightError("rollout.engine=vllm loads a model directory: set policy.init_from or rollout.model.")
    paths = {
        "policy.init_from": cfg.policy.init_from,
        "critic.init_from": cfg.critic.init_from if cfg.uses_critic else None,
        "rollout.model": cfg.rollout.model if cfg.rollout.engine == "vllm" else None,
    }
    for key, path in paths.items():
        if path:
            check_model_directory(path, key)


def check_reward_service(cfg: RLConfig) -> None:
    """RLHF's rewards come from the reward-model service: one this run starts, or one at a URL that answers."""
    service = cfg.reward.service
    if service.launch:
        check_service_model(launched_service(cfg), "reward.service.server.")
        return
    if not service.url:
        if cfg.stage == "rlhf":
            raise PreflightError(
                "stage=rlhf scores its responses with the reward-model service: set reward.service.url to a running "
                "one (python rl/serve_rm.py), or reward.service.launch=true to start one in this run"
            )
        return
    token, url = read_client_token(service), service.url.rstrip("/")
    try:
        reply = requests.get(f"{url}/v1/stats", headers={"Authorization": f"Bearer {token}"}, timeout=10)
    except requests.RequestException as error:
        raise PreflightError(f"reward.service.url={service.url} does not answer: {error}") from error
    if reply.status_code == 401:
        raise PreflightError(f"the reward service at {service.url} refuses the token in {service.token_env}")
    if reply.status_code != 200:
        raise PreflightError(f"reward.service.url={service.url}: GET /v1/stats answered {reply.status_code}")


def launched_service(cfg: RLConfig) -> ServiceConfig:
    """The service a run starts (`reward.service.launch`), its settings checked."""
    return ServiceConfig.from_dict(cfg.reward.service.server, "reward.service.server.")


def check_service_model(config: ServiceConfig, prefix: str = "") -> None:
    """A scalar backend's reward model is on disk (a replica would otherwise die at start, and Serve retry it)."""
    if config.rm.backend == "scalar":
        check_model_directory(config.rm.scalar.model, f"{prefix}rm.scalar.model")


def gpus_needed(cfg: RLConfig) -> float:
    """GPUs the actors ask Ray for: the training ranks, the engines where they have GPUs of their own
    (colocated, they take part of the training ranks' bundles), and a launched reward service's replicas."""
    engines = 0.0 if cfg.rollout.colocate else cfg.rollout.num_engines * cfg.engine_gpus
    service = 0.0
    if cfg.reward.service.launch:
        server = launched_service(cfg)
        service = server.replicas * server.replica_gpus
    return cfg.trainer.world_size * cfg.trainer.num_gpus_per_rank + engines + service


def check_resources(cfg: RLConfig, resources: dict[str, float]) -> None:
    """`resources` is the Ray cluster's (`ray.cluster_resources()`): a request it cannot meet would wait
    on the autoscaler forever."""
    needed, available = gpus_needed(cfg), resources.get("GPU", 0.0)
    if needed > available:
        engines = "vLLM engines" if cfg.rollout.engine == "vllm" else "transformers engines"
        raise PreflightError(
            f"this run needs {needed:g} GPUs (trainer.world_size={cfg.trainer.world_size} training ranks x "
            f"trainer.num_gpus_per_rank={cfg.trainer.num_gpus_per_rank:g}, rollout.num_engines="
            f"{cfg.rollout.num_engines} {engines}, and a launched reward service's replicas) but the Ray cluster "
            f"has {available:g}. Without GPUs, run "
            "rollout=hf trainer.num_gpus_per_rank=0; with fewer, lower trainer.world_size or rollout.num_engines, "
            "or set rollout.colocate=true (with algo.max_staleness=0 rollout.partial=false)."
        )


def check_freeze(cfg: RLConfig) -> None:
    """vLLM takes a weight update a whole module at a time: `policy.freeze` must not cut one (rl/engines/fused.py)."""
    if cfg.rollout.engine != "vllm":
        return
    from step3vl_train.model import Step3VLConfig
    from step3vl_train.model.counting import build_on_meta

    names = [name for name, _ in build_on_meta(Step3VLConfig.from_dict(cfg.model)).named_parameters()]
    freeze = tuple(cfg.policy.freeze)
    try:
        check_whole_modules((name, not name.startswith(freeze)) for name in names)
    except ValueError as error:
        raise PreflightError(str(error)) from None


def check_resume(cfg: RLConfig) -> None:
    """A run resumes its ZeRO-3 shards only on as many training ranks as wrote them."""
    run_dir = Path(cfg.trainer.output_dir)
    latest = Checkpointer(run_dir, keep_last=0).latest()
    if latest is None or not (run_dir / "config.yaml").is_file():
        return
    saved = OmegaConf.load(run_dir / "config.yaml")
    written_by = saved.get("trainer", saved.get("run")).world_size  # `run` in configs written before the rename
    if written_by != cfg.trainer.world_size:
        raise PreflightError(
            f"trainer.output_dir={cfg.trainer.output_dir} resumes from {latest.name}, written by "
            f"trainer.world_size={written_by} training ranks, and this run has {cfg.trainer.world_size}. DeepSpeed's "
            f"shards resume only on as many ranks: re-run with trainer.world_size={written_by}, or export the "
            f"policy (python launch/export_hf.py checkpoint={cfg.trainer.output_dir} out=DIR) and start a new run "
            "with policy.init_from=DIR."
        )


def preflight(cfg: RLConfig) -> None:
    """Everything but the cluster's resources (`check_resources`), before Ray starts."""
    check_source_files("prompts", cfg.prompts.root, {"sources": cfg.prompts.sources, "eval": cfg.prompts.eval})
    check_weights(cfg)
    check_freeze(cfg)
    check_reward_service(cfg)
    check_resume(cfg)
