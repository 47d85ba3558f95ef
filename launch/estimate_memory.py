"""What a recipe needs per rank, part by part, and whether it fits (step3vl_train/train/memory.py).

python launch/estimate_memory.py +recipe=sft_stage1 [cluster.gpus=8 cluster.gpu_memory_gb=80] [overrides]
python launch/estimate_memory.py +recipe=rlvr   # RL's training ranks (cluster.gpus of them) and a vLLM engine GPU

Overrides are the recipe's own (trainer.sequence_parallel=4, compute.vision_chunk=4, ...). Sizes are for
bf16 on GPUs; where a setting does not fit, the smallest sequence-parallel degree that does is named.
"""

import sys
from pathlib import Path

from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from step3vl_train.data.config import AUTO_WORKERS_CAP
from step3vl_train.model import Step3VLConfig
from step3vl_train.train.memory import (
    ClusterConfig,
    EngineShape,
    Estimate,
    TrainingShape,
    estimate_colocated_sync,
    estimate_engine,
    estimate_rl,
    estimate_training,
    rl_resident,
)
from step3vl_train.train.recipes import RECIPES, register_recipes

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def split_arguments(argv: list[str]) -> tuple[str, ClusterConfig, list[str]]:
    """(recipe name, cluster, the other overrides)."""
    recipe = next((a.split("=", 1)[1] for a in argv if a.startswith("+recipe=")), None)
    if recipe is None:
        raise SystemExit(f"usage: {__doc__.splitlines()[2]}")
    cluster = OmegaConf.merge(
        OmegaConf.structured(ClusterConfig),
        OmegaConf.from_dotlist([a.removeprefix("cluster.") for a in argv if a.startswith("cluster.")]),
    )
    return recipe, OmegaConf.to_object(cluster), [a for a in argv if not a.startswith("cluster.")]


def is_rl(recipe: str) -> bool:
    return "rollout" in OmegaConf.load(RECIPES / f"{recipe}.yaml")


def training_shape(cfg, cluster: ClusterConfig) -> TrainingShape:
    packing, zero = cfg.data.packing, cfg.deepspeed.zero_optimization
    sequence_parallel = cfg.trainer.sequence_parallel
    return TrainingShape(
        seq_len=packing.seq_len,
        micro_batch=cfg.data.micro_batch_size,
        world=cluster.gpus,
        sequence_parallel=sequence_parallel,
        checkpointing=cfg.trainer.gradient_checkpointing,
        vision_chunk=cfg.compute.vision_chunk,
        vision_checkpoint=cfg.compute.vision_checkpoint,
        loss_chunk=cfg.compute.loss_chunk,
        attention=cfg.compute.attention,
        max_views_per_pack=packing.max_views_per_pack,
        max_images_per_pack=packing.max_images_per_pack,
        num_workers=reading_workers(cfg.data.num_workers, cluster, sequence_parallel),
        prefetch_factor=cfg.data.prefetch_factor,
        max_live_parameters=zero.stage3_max_live_parameters,
        reduce_bucket_size=zero.reduce_bucket_size,
    )


def reading_workers(setting, cluster: ClusterConfig, sequence_parallel: int) -> int:
    """data.num_workers of the rank that reads (a sequence-parallel group's first), auto resolved as the
    loader resolves it (data/config.py: loader_workers) on ranks of `cluster.cpus_per_gpu` cores."""
    if setting != "auto":
        return setting
    return max(1, min(sequence_parallel * (cluster.cpus_per_gpu - 1), AUTO_WORKERS_CAP))


def rl_shapes(cfg, world: int) -> tuple[TrainingShape, TrainingShape]:
    """The policy and the critic on RL's `world` training ranks (with the rollout engines colocated, or on
    GPUs of their own). A forward holds `micro_batch_tokens` padded tokens, or one sequence (a prompt plus
    a whole response) where that is longer: the worst is that many tokens in as few rows as the longest
    sequence allows, each row with a prompt's images. Shared rows (algo.shared_prompt) keep to the same
    budget, with one prompt's images a row: no worse. A sequence-parallel group shares a forward, each rank
    a slice of its tokens; with shared rows the kernel is flex_packed (its block mask counted)."""
    length = cfg.prompts.max_prompt_tokens + cfg.rollout.max_new_tokens
    views = cfg.prompts.max_prompt_tokens // 83  # crops a prompt's token budget holds
    zero = cfg.deepspeed.zero_optimization

    def shape(role) -> TrainingShape:
        tokens = max(role.micro_batch_tokens, length)
        rows = -(-tokens // length)
        return TrainingShape(
            seq_len=-(-tokens // rows),
            micro_batch=rows,
            world=world,
            sequence_parallel=role.sequence_parallel,
            checkpointing=role.gradient_checkpointing,
            vision_chunk=cfg.compute.vision_chunk,
            loss_chunk=cfg.compute.loss_chunk,
            attention="flex_packed" if cfg.algo.shared_prompt else cfg.compute.attention,
            max_views_per_pack=views,
            max_images_per_pack=views,
            frozen=tuple(role.freeze),
            max_live_parameters=zero.stage3_max_live_parameters,
            reduce_bucket_size=zero.reduce_bucket_size,
        )

    return shape(cfg.policy), shape(cfg.critic)


def engine_estimate(cfg, cluster: ClusterConfig) -> Estimate:
    """A GPU of the recipe's vLLM engine (`rollout.*`), beside a training rank's states when colocated."""
    model = Step3VLConfig.from_dict(OmegaConf.to_container(cfg.model, resolve=True))
    rollout = cfg.rollout
    engine = EngineShape(
        seq_len=cfg.prompts.max_prompt_tokens + rollout.max_new_tokens,
        tensor_parallel=rollout.tensor_parallel_size,
        memory_utilization=rollout.gpu_memory_utilization,
        colocated=rollout.colocate,
    )
    return estimate_engine(model, engine, rl_resident(model, *rl_shapes(cfg, cluster.gpus)), cluster.gpu_memory_gb)


def colocated_sync_estimate(cfg, cluster: ClusterConfig) -> Estimate:
    """A colocated GPU while the weights cross by CUDA IPC, between the engine's two wake steps."""
    model = Step3VLConfig.from_dict(OmegaConf.to_container(cfg.model, resolve=True))
    rollout, resident = cfg.rollout, rl_resident(model, *rl_shapes(cfg, cluster.gpus))
    bucket_bytes = rollout.sync_bucket_mb * 2**20
    return estimate_colocated_sync(model, rollout.tensor_parallel_size, resident, bucket_bytes, cluster.gpu_memory_gb)


def estimate(recipe: str, cluster: ClusterConfig, overrides: list[str]) -> tuple[Estimate, object]:
    with initialize_config_dir(str(CONFIGS), version_base="1.3"):
        cfg = compose("rl" if is_rl(recipe) else "pretrain", [*overrides, "tokenizer=none"])
    model = Step3VLConfig.from_dict(OmegaConf.to_container(cfg.model, resolve=True))
    if is_rl(recipe):
        return estimate_rl(model, *rl_shapes(cfg, cluster.gpus), cluster.gpu_memory_gb), cfg
    return estimate_training(model, training_shape(cfg, cluster), cluster.gpu_memory_gb), cfg


def main(argv: list[str]) -> None:
    register_recipes()
    recipe, cluster, overrides = split_arguments(argv)
    result, cfg = estimate(recipe, cluster, overrides)
    print(f"{recipe} on {cluster.gpus} GPUs of {cluster.gpu_memory_gb:g} GiB, per rank:")
    print(result.table())
    if is_rl(recipe):
        where = "beside training rank i" if cfg.rollout.colocate else "a GPU of its own"
        print(f"\nrollout engine (vLLM, {where}), per GPU:")
        print(engine_estimate(cfg, cluster).table())
        if cfg.rollout.colocate:
            print("\nweight sync (colocated, CUDA IPC; the engine's KV cache is woken after it), per GPU:")
            print(colocated_sync_estimate(cfg, cluster).table())
    if not result.fits and not is_rl(recipe):
        degree = next(
            (
                sp
                for sp in (2, 4, 8, 16)
                if cluster.gpus % sp == 0
                and estimate(recipe, cluster, [*overrides, f"trainer.sequence_parallel={sp}"])[0].fits
            ),
            None,
        )
        advice = f"trainer.sequence_parallel={degree}" if degree else "more GPUs (cluster.gpus) or shorter rows"
        print(f"it needs {advice}")


if __name__ == "__main__":
    main(sys.argv[1:])
