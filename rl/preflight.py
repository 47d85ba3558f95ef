"""An RL config checked against the disk and the cluster before any actor starts. Each mistake is one
message naming the problem and the fix; none surfaces later as an actor's crash, which the driver would
retry as if it were transient."""

from __future__ import annotations

from pathlib import Path

from omegaconf import OmegaConf

from rl.config import RLConfig
from step3vl_train.model.checkpoint import CONFIG_NAME, INDEX_NAME, SINGLE_FILE_NAME
from step3vl_train.train.checkpoint import Checkpointer


class PreflightError(ValueError):
    """The run cannot start as configured."""


def check_model_directory(path: str, key: str) -> None:
    """`path` holds a model in the released layout: `config.json` and its safetensors."""
    directory = Path(path)
    layout = "a released-format model directory (launch/export_hf.py writes one; StepFun's release is one)"
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


def gpus_needed(cfg: RLConfig) -> float:
    """GPUs the actors ask Ray for: the training ranks, and the engines where they have GPUs of their own
    (colocated, they take part of the training ranks' bundles)."""
    engines = 0.0 if cfg.rollout.colocate else cfg.rollout.num_engines * cfg.engine_gpus
    return cfg.run.world_size * cfg.run.num_gpus_per_rank + engines


def check_resources(cfg: RLConfig, resources: dict[str, float]) -> None:
    """`resources` is the Ray cluster's (`ray.cluster_resources()`): a request it cannot meet would wait
    on the autoscaler forever."""
    needed, available = gpus_needed(cfg), resources.get("GPU", 0.0)
    if needed > available:
        engines = "vLLM engines" if cfg.rollout.engine == "vllm" else "transformers engines"
        raise PreflightError(
            f"this run needs {needed:g} GPUs (run.world_size={cfg.run.world_size} training ranks x "
            f"run.num_gpus_per_rank={cfg.run.num_gpus_per_rank:g}, and rollout.num_engines="
            f"{cfg.rollout.num_engines} {engines}) but the Ray cluster has {available:g}. Without GPUs, run "
            "rollout=hf run.num_gpus_per_rank=0; with fewer, lower run.world_size or rollout.num_engines, or set "
            "rollout.colocate=true."
        )


def check_resume(cfg: RLConfig) -> None:
    """A run resumes its ZeRO-3 shards only on as many training ranks as wrote them."""
    run_dir = Path(cfg.run.output_dir)
    latest = Checkpointer(run_dir, keep_last=0).latest()
    if latest is None or not (run_dir / "config.yaml").is_file():
        return
    written_by = OmegaConf.load(run_dir / "config.yaml").run.world_size
    if written_by != cfg.run.world_size:
        raise PreflightError(
            f"run.output_dir={cfg.run.output_dir} resumes from {latest.name}, written by run.world_size={written_by} "
            f"training ranks, and this run has {cfg.run.world_size}. DeepSpeed's shards resume only on as many "
            f"ranks: re-run with run.world_size={written_by}, or export the policy (python launch/export_hf.py "
            f"checkpoint={cfg.run.output_dir} out=DIR) and start a new run with policy.init_from=DIR."
        )


def preflight(cfg: RLConfig, resources: dict[str, float]) -> None:
    check_weights(cfg)
    check_resources(cfg, resources)
    check_resume(cfg)
