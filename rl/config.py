"""RL configuration: the dataclasses behind `configs/rl.yaml` and its groups (`stage/`, `rollout/`, `reward/`).

The YAML and these classes have the same shape; `RLConfig.from_dict` merges one onto the other, so an
unknown or mistyped key is an error naming it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from rl.algos.advantages import ESTIMATORS
from rl.algos.losses import AGGREGATIONS
from rl.pacore.config import PaCoReConfig
from rl.rewards.scorer import RewardConfig
from step3vl_train.data.config import SourceConfig, train_source
from step3vl_train.model.compute import ComputeConfig, check_shared_prompts
from step3vl_train.model.config import Step3VLConfig
from step3vl_train.processing.model_processor import model_settings
from step3vl_train.train.config import LoggingConfig, OptimConfig
from step3vl_train.usage import build

ENGINES = ("hf", "vllm")
# Keys RL had before it shared pre-training's names: an override with the old prefix is refused, naming the new.
RENAMED_KEYS = {"run.": "trainer."}


@dataclass
class PromptsConfig:
    sources: list[SourceConfig] = field(default_factory=list)  # `weight` counts prompts here, not tokens
    root: str | None = None
    train: str | None = None  # a shortcut: these shards (paths, globs, braces) are the only source
    prompts_per_step: int = 512
    max_prompt_tokens: int = 4096  # a longer prompt is skipped (too_long) and counted
    seed: int = 0
    eval: list[SourceConfig] = field(default_factory=list)  # held-out prompts for validation; `weight` unused
    eval_max_prompts: int | None = None  # the first this many of each eval source; None: all of it

    def __post_init__(self) -> None:
        if self.train:
            self.sources = [train_source(self.train)]
        if self.eval_max_prompts is not None and self.eval_max_prompts < 1:
            raise ValueError(f"prompts.eval_max_prompts must be positive or null, not {self.eval_max_prompts}")


@dataclass
class EvalSamplingConfig:
    """Validation's sampling (rl/validation.py). The paper evaluates at temperature 1, top-p 1, top-k off,
    with several samples a problem (spec 5.8)."""

    n: int = 4  # responses per prompt
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0: off
    max_new_tokens: int | None = None  # None: rollout.max_new_tokens

    def __post_init__(self) -> None:
        if self.n < 1:
            raise ValueError(f"rollout.eval.n must be at least 1, not {self.n}")


@dataclass
class RolloutConfig:
    engine: str = "hf"  # hf: transformers generate (CPU or GPU); vllm: vLLM 0.33 (GPU)
    model: str | None = None  # vllm: the directory it loads (a released-format one as it is); None: policy.init_from
    n: int = 16  # responses per prompt
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0: off
    max_new_tokens: int = 20480
    batch_size: int = 64  # hf: sequences per generate call
    num_engines: int = 1
    sync_bucket_mb: int = 256  # weight sync sends parameters in buckets of about this size
    # A weight sync that has not ended after this long has failed (an engine that failed before joining an
    # NCCL broadcast leaves the sender waiting forever): the run names the engines and restarts its actors.
    sync_timeout_s: float = 600.0
    # vllm: engines share the training ranks' GPUs (engine i on rank i's), sleeping while the trainer works;
    # weights then move by CUDA IPC. Otherwise engines have GPUs of their own and weights move over NCCL.
    colocate: bool = False
    # A weight sync pauses the responses still being written; they go on from their tokens under the new
    # weights, and batches take the groups that are whole (needs algo.max_staleness >= 1; rl/producer.py).
    partial: bool = False
    partial_extra: float = 0.25  # partial: prompts drawn beyond a batch's, as a share of it: the tail's slack
    gpu_memory_utilization: float = 0.6  # vllm
    tensor_parallel_size: int = 1  # vllm
    enforce_eager: bool = False  # vllm
    eval: EvalSamplingConfig = field(default_factory=EvalSamplingConfig)  # validation's sampling

    @property
    def weight_transfer(self) -> str:
        return "ipc" if self.colocate else "nccl"

    def __post_init__(self) -> None:
        if self.engine not in ENGINES:
            raise ValueError(f"rollout.engine must be one of {ENGINES}, not {self.engine!r}")
        if self.colocate and (self.engine != "vllm" or self.tensor_parallel_size != 1):
            raise ValueError("rollout.colocate needs rollout.engine=vllm with tensor_parallel_size=1")
        if self.partial_extra < 0:
            raise ValueError(f"rollout.partial_extra must be at least 0, not {self.partial_extra}")
        if self.sync_timeout_s <= 0:
            raise ValueError(f"rollout.sync_timeout_s must be positive, not {self.sync_timeout_s}")
        if self.top_p < 1 or self.top_k > 0:
            raise ValueError(
                f"rollout.top_p={self.top_p:g}, rollout.top_k={self.top_k}: training rollouts sample the whole "
                "distribution. With top-p or top-k, the engine samples from a truncated, renormalised "
                "distribution (vLLM reports its log-probs that way), while the trainer scores the full softmax at "
                "the temperature: the importance ratios and the clip would be off by the nucleus's log-mass on "
                "every token. Keep rollout.top_p=1 and rollout.top_k=0; rollout.eval.top_p and top_k are free."
            )


@dataclass
class AlgoConfig:
    estimator: str = "gae"  # gae (PPO with a critic, the paper's), grpo, rloo, reinforce_pp
    gamma: float = 1.0
    lam: float = 1.0
    clip_low: float = 0.2
    clip_high: float = 0.2
    tis_cap: float | None = 8.0  # truncated importance sampling against the engine's log-probs; null: off
    minibatches: int = 4  # optimizer steps per iteration, each on a quarter of the responses
    epochs: int = 1  # passes over the iteration's responses
    loss_aggregation: str = "token-mean"
    value_clip: float | None = None
    grpo_scale_by_std: bool = True
    drop_uniform_groups: bool = False  # dynamic sampling: drop prompts whose responses all score the same
    max_sampling_rounds: int = 3  # dynamic sampling: rounds of drawing more prompts to refill the batch
    # Batch t may be generated by policy versions t-1-k and newer (the policy that trains it is version t-1):
    # 0 is the synchronous loop; k >= 1 generates up to k batches ahead while the trainer updates. Tokens
    # older than that (long responses continued across syncs, rollout.partial) stay out of the losses.
    max_staleness: int = 0
    # A group's responses in one forward row after a single copy of their prompt, in scoring, the update and
    # the critic (rl/experience.py: shared_sequence_batch): the same numbers as a row each, without running
    # the prompt once a response. Needs a packed kernel (compute.attention auto: sdpa_packed, flex_packed).
    shared_prompt: bool = True

    def __post_init__(self) -> None:
        if self.estimator not in ESTIMATORS:
            raise ValueError(f"algo.estimator must be one of {ESTIMATORS}, not {self.estimator!r}")
        if self.max_staleness < 0:
            raise ValueError(f"algo.max_staleness must be at least 0, not {self.max_staleness}")
        if self.loss_aggregation not in AGGREGATIONS:
            raise ValueError(f"algo.loss_aggregation must be one of {AGGREGATIONS}, not {self.loss_aggregation!r}")


@dataclass
class ModelRoleConfig:
    """The policy or the critic: a ZeRO-3 group of `world_size` ranks.

    `micro_batch_tokens`: the padded tokens of one forward (rows x the longest row, prompt plus response),
    those of a sequence-parallel group's forward where `sequence_parallel` ranks share its rows. Each rank
    cuts its share of a minibatch into forwards within it, responses of similar length together,
    and every rank makes as many forwards as the rank that needs the most (rl/micro_batches.py). A single
    sequence longer than the budget is a forward of its own: size the budget to the longest sequence
    (prompts.max_prompt_tokens + rollout.max_new_tokens) where that one must fit as well.
    """

    init_from: str | None = None  # a released-format directory (an export); the critic defaults to the policy's
    from_scratch: bool = False  # policy: start from random weights; without it a missing init_from is refused
    optim: OptimConfig = field(default_factory=OptimConfig)
    freeze: list[str] = field(default_factory=lambda: ["vision_model."])  # name prefixes not trained
    micro_batch_tokens: int = 2048  # padded tokens a forward; a longer single sequence runs alone
    # Ranks sharing each forward's rows, a slice each (DeepSpeed Ulysses, as trainer.sequence_parallel in
    # pretraining and SFT): divides trainer.world_size, and the critic's equals the policy's.
    sequence_parallel: int = 1
    grad_clip: float = 1.0
    gradient_checkpointing: bool = False
    enabled: bool = True  # the critic: off for critic-free estimators
    # The frozen vision tower's features of each image prompt, kept for the iteration (rl/feature_cache.py)
    # up to this much memory a rank; prompts beyond it run the tower in each forward. 0: off. The critic
    # reads the policy's when their towers hold the same weights.
    image_feature_cache_mb: float = 1024.0


@dataclass
class RLTrainerConfig:
    output_dir: str = "outputs/rl"
    max_steps: int = 600  # iterations
    save_every: int = 10
    keep_last: int = 3
    seed: int = 0
    world_size: int = 2  # training ranks (each holds its policy and critic shards)
    bf16: bool | None = None  # None: bf16 where CUDA is available
    num_gpus_per_rank: float = 0.0  # Ray resources: 1 on a GPU cluster, 0 on the CPU
    max_restarts: int = 3  # times a run replaces dead actors and goes on from its latest checkpoint
    log_responses: int = 4  # responses an iteration whose text goes to rollouts.jsonl
    eval_every: int = 0  # validation on prompts.eval every this many iterations and at the last; 0: never
    eval_before_train: bool = False  # and once before the first iteration (its own row, step 0)
    # Seconds between SIGTERM and the scheduler's SIGKILL: the run stops after the iteration in flight, saves
    # it where the save fits, or abandons it when they run out; exit code 143 (docs/rl.md, "Stopping a run").
    preempt_grace_s: float = 120.0

    @property
    def use_bf16(self) -> bool:
        import torch

        return torch.cuda.is_available() if self.bf16 is None else self.bf16


@dataclass
class RayConfig:
    address: str | None = None  # join a running cluster; None starts a local instance
    num_cpus: int | None = None  # local instance: logical CPUs (default: enough for every actor)


@dataclass
class RLConfig:
    stage: str = "rlvr"
    tokenizer: str = "tiny"
    model: dict[str, Any] = field(default_factory=dict)  # configs/model/*.yaml
    # configs/processor/*.yaml, or some of its fields, over policy.init_from's own (an export carries what it
    # trained with); the policy's settings in the end (__post_init__)
    processor: dict[str, Any] = field(default_factory=dict)
    deepspeed: dict[str, Any] = field(default_factory=dict)  # configs/deepspeed/*.yaml
    compute: ComputeConfig = field(default_factory=ComputeConfig)  # attention kernel, chunk sizes
    prompts: PromptsConfig = field(default_factory=PromptsConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    algo: AlgoConfig = field(default_factory=AlgoConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    policy: ModelRoleConfig = field(default_factory=ModelRoleConfig)
    critic: ModelRoleConfig = field(default_factory=ModelRoleConfig)
    trainer: RLTrainerConfig = field(default_factory=RLTrainerConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    pacore: PaCoReConfig = field(default_factory=PaCoReConfig)  # stage=pacore: the synthesis prompts
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    def __post_init__(self) -> None:
        if not self.prompts.sources:
            raise ValueError("prompts.sources is empty: give prompt shards, or prompts.train=PATHS")
        if self.algo.estimator == "gae" and not self.critic.enabled:
            raise ValueError("algo.estimator=gae needs the critic (critic.enabled=true)")
        if self.algo.estimator != "gae" and self.rollout.n < 2:
            raise ValueError(f"algo.estimator={self.algo.estimator} compares responses to one prompt: rollout.n >= 2")
        architecture = Step3VLConfig.from_dict(self.model)
        self.processor = model_settings(self.policy.init_from, self.processor, architecture, "processor")
        if self.rollout.engine == "vllm" and self.processor.get("crop_rule", "released") != "vllm":
            raise ValueError(
                "rollout.engine=vllm needs processor.crop_rule=vllm (configs/rollout/vllm.yaml sets it): vLLM 0.33 "
                "gives a 728-pixel-long image crops where the released processor does not"
            )
        if self.rollout.colocate and (
            self.rollout.num_engines > self.trainer.world_size or not self.trainer.num_gpus_per_rank
        ):
            raise ValueError("rollout.colocate puts engine i on training rank i's GPU: num_engines <= world_size, GPUs")
        if self.rollout.partial and not self.algo.max_staleness:
            raise ValueError(
                "rollout.partial continues a response under newer weights than began it: it needs "
                "algo.max_staleness >= 1"
            )
        if self.algo.max_staleness and self.rollout.colocate:
            raise ValueError(
                "algo.max_staleness >= 1 generates while the trainer updates; colocated engines sleep then "
                "(rollout.colocate): set algo.max_staleness=0, or give the engines GPUs of their own"
            )
        if self.trainer.preempt_grace_s < 0:
            raise ValueError(f"trainer.preempt_grace_s must be at least 0, not {self.trainer.preempt_grace_s}")
        if self.trainer.eval_every < 0:
            raise ValueError(f"trainer.eval_every must be 0 (never) or positive, not {self.trainer.eval_every}")
        if (self.trainer.eval_every or self.trainer.eval_before_train) and not self.prompts.eval:
            raise ValueError("trainer.eval_every and eval_before_train need held-out prompts: prompts.eval is empty")
        self._check_forward_rows()
        responses = self.prompts.prompts_per_step * self.rollout.n
        if responses % (self.algo.minibatches * self.data_parallel):
            raise ValueError(
                f"{responses} responses an iteration (prompts.prompts_per_step x rollout.n) do not split into "
                f"algo.minibatches={self.algo.minibatches} x {self.data_parallel} equal parts (trainer.world_size="
                f"{self.trainer.world_size} / policy.sequence_parallel={self.sequence_parallel})"
            )
        for name, role in (("policy", self.policy), ("critic", self.critic)):
            if name == "critic" and not self.uses_critic:
                continue
            if role.micro_batch_tokens < 1:
                raise ValueError(f"{name}.micro_batch_tokens must be positive, not {role.micro_batch_tokens}")
            if role.image_feature_cache_mb < 0:
                raise ValueError(f"{name}.image_feature_cache_mb must be 0 (off) or positive")
            if role.image_feature_cache_mb and not any("vision_model.".startswith(p) for p in role.freeze):
                raise ValueError(
                    f"{name}.image_feature_cache_mb={role.image_feature_cache_mb} keeps the vision tower's features "
                    f"for an iteration, which needs the tower frozen: {name}.freeze={role.freeze} does not hold "
                    f"vision_model.; add it, or set {name}.image_feature_cache_mb=0"
                )

    @property
    def on_policy_update(self) -> bool:
        """One minibatch, one epoch: the update's one forward of each response is under the policy that
        wrote it, so that forward's log-probs are the old ones and no scoring pass computes them."""
        return self.algo.minibatches == 1 and self.algo.epochs == 1

    def _check_forward_rows(self) -> None:
        """Sequence parallelism, and the kernel that reads shared-prompt rows."""
        size, world = self.policy.sequence_parallel, self.trainer.world_size
        if size < 1 or world % size:
            raise ValueError(f"policy.sequence_parallel={size} must divide trainer.world_size={world}")
        if self.algo.shared_prompt:
            check_shared_prompts(self.compute.attention)  # here as well as where the engine resolves it: at start
        if self.uses_critic and self.critic.sequence_parallel != size:
            raise ValueError(
                f"critic.sequence_parallel={self.critic.sequence_parallel} differs from policy.sequence_parallel="
                f"{size}: DeepSpeed's Ulysses keeps one sequence-parallel group a process and wraps the attention "
                "kernel of every model in it; set them equal"
            )

    @property
    def sequence_parallel(self) -> int:
        """Ranks sharing each forward's rows (the critic's the same)."""
        return self.policy.sequence_parallel

    @property
    def data_parallel(self) -> int:
        """Groups of ranks that hold different responses."""
        return self.trainer.world_size // self.sequence_parallel

    @property
    def minibatch_per_rank(self) -> int:
        """Responses each rank trains on in each minibatch (those of its sequence-parallel group)."""
        return self.prompts.prompts_per_step * self.rollout.n // (self.algo.minibatches * self.data_parallel)

    @property
    def trainer_gpu_share(self) -> float:
        """The share of its GPU a training rank asks Ray for: half when an engine is colocated on it."""
        return 0.5 if self.rollout.colocate else 1.0

    @property
    def engine_gpus(self) -> float:
        """GPUs each rollout engine asks Ray for: the rest of a training rank's GPU when colocated, its
        tensor-parallel GPUs (vLLM), or a training rank's worth (transformers)."""
        if self.rollout.colocate:
            return self.trainer.num_gpus_per_rank * (1 - self.trainer_gpu_share)
        if self.rollout.engine == "vllm":
            return self.rollout.tensor_parallel_size
        return self.trainer.num_gpus_per_rank

    @property
    def uses_critic(self) -> bool:
        return self.critic.enabled and self.algo.estimator == "gae"

    @classmethod
    def from_dict(cls, values: Any) -> RLConfig:
        return build(cls, values)
