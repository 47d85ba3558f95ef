"""Optimizer and learning-rate schedule settings: the dataclasses behind `configs/optim/*.yaml`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from omegaconf import MISSING

from step3vl_train.model.compute import ComputeConfig
from step3vl_train.usage import UsageError

SCHEDULE_SHAPES = ("cosine", "linear", "constant")


@dataclass
class ParamGroupConfig:
    """Parameters whose name matches `pattern` (re.search), unless an earlier group claimed them.
    Unset fields take the optimizer's values."""

    name: str
    pattern: str
    lr: float | None = None  # peak learning rate
    weight_decay: float | None = None
    warmup_tokens: int | None = None


@dataclass
class ScheduleConfig:
    """Learning rate against tokens trained, so it holds whatever the batch size: linear warmup from 0 to
    each group's peak over `warmup_tokens`, then `shape` down to peak * min_lr_ratio at `decay_tokens`
    (counted from the start, warmup included), then flat."""

    shape: str = "cosine"
    warmup_tokens: int = 0
    decay_tokens: int = 1
    min_lr_ratio: float = 0.1

    def __post_init__(self) -> None:
        if self.shape not in SCHEDULE_SHAPES:
            raise UsageError(f"optim.schedule.shape must be one of {SCHEDULE_SHAPES}, not {self.shape!r}")
        if self.decay_tokens < 1 or self.warmup_tokens < 0 or not 0 <= self.min_lr_ratio <= 1:
            raise UsageError(
                "optim.schedule needs decay_tokens >= 1, warmup_tokens >= 0 and 0 <= min_lr_ratio <= 1, got "
                f"{self.decay_tokens}, {self.warmup_tokens}, {self.min_lr_ratio}"
            )


@dataclass
class DecayConfig:
    """A later phase's leg of the learning rate: from the factor the run has reached at the phase's start,
    `shape` down to peak * min_lr_ratio at `decay_tokens` (counted from the run's start), then flat;
    `constant` holds the factor reached."""

    shape: str = "linear"
    decay_tokens: int = 1
    min_lr_ratio: float = 0.1

    def __post_init__(self) -> None:
        if self.shape not in SCHEDULE_SHAPES:
            raise UsageError(f"a phase's schedule.shape must be one of {SCHEDULE_SHAPES}, not {self.shape!r}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise UsageError(f"a phase's schedule.min_lr_ratio must be in [0, 1], not {self.min_lr_ratio}")


@dataclass
class PhaseConfig:
    """`phases.NAME`: from `start_tokens` trained (all ranks) on, the data mixture takes these `weights`
    (by `data.sources` name; a source left out is not read in this phase; none: the mixture goes on as it
    was) and the learning rate `schedule`. The run's first phase is `data.sources` with `optim.schedule`."""

    start_tokens: int = MISSING
    weights: dict[str, float] = field(default_factory=dict)
    schedule: DecayConfig = field(default_factory=DecayConfig)


@dataclass
class OptimConfig:
    lr: float = 5e-5
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    weight_decay: float = 0.01
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    param_groups: list[ParamGroupConfig] = field(default_factory=lambda: [ParamGroupConfig("all", ".*")])


@dataclass
class LoggingConfig:
    project: str = "step3vl-train"
    name: str | None = None  # default: the run directory's name
    tags: list[str] = field(default_factory=list)
    mode: str | None = None  # None: online with WANDB_API_KEY set, offline without


@dataclass
class TrainerConfig:
    output_dir: str = "outputs/run"  # checkpoints/, metrics.jsonl and config.yaml go here
    max_steps: int | None = 100  # optimizer steps; the run stops at whichever of these comes first
    max_tokens: int | None = None  # tokens trained on, all ranks (the paper's unit)
    init_from: str | None = None  # a released-format model directory (or an export) to start from
    requires_init_from: bool = False  # a later stage: starting it from random weights is a mistake
    from_scratch: bool = False  # says that random weights are meant where requires_init_from is set
    # A run directory whose latest checkpoint this run starts from, as a resume would: weights, optimizer,
    # data position and progress (phase 2 from phase 1). Only a run with no checkpoint of its own uses it.
    continue_from: str | None = None
    start_phase: str | None = None  # a later phase (`phases` key) this run must start at the start of
    # With start_phase: start from init_from's weights alone, with a new optimizer and data from the start.
    fresh_optimizer: bool = False
    grad_accum: int = 1  # micro-batches a step, per rank
    grad_clip: float = 1.0
    bf16: bool | None = None  # None: bf16 where CUDA is available, fp32 on the CPU
    gradient_checkpointing: bool = False
    sequence_parallel: int = 1  # ranks sharing each packed row (DeepSpeed Ulysses); must divide the world size
    log_every: int = 1
    save_every: int = 100  # steps between checkpoints; the last step is always saved (0: no checkpoint at all)
    keep_last: int = 3  # checkpoints kept; older ones are deleted once a newer one is complete
    seed: int = 0
    peak_flops_per_device: float | None = None  # for MFU; None: looked up from the GPU's name
    predict_every: int = 0  # steps between greedy answers to `predict_prompts` (0: never)
    predict_prompts: list[dict] = field(default_factory=list)  # {"image": path or null, "text": question}
    predict_max_new_tokens: int = 32
    log_sample_keys: bool = False  # each rank's sample keys by step in samples/rank{R}.jsonl
    # Steps between validations on data.eval, plus one at the run's last step; 0: none. (A reward model,
    # train/reward_trainer.py, always evaluates its held-out pairs at the last step.)
    eval_every: int = 0
    # Seconds between SIGTERM and the scheduler's SIGKILL: the run stops after the step in flight, saves it
    # where the save still fits in them, and exits with code 143 (docs/training.md, "Stopping a run").
    preempt_grace_s: float = 120.0

    def __post_init__(self) -> None:
        if self.max_steps is None and self.max_tokens is None:
            raise UsageError("trainer needs max_steps or max_tokens")
        if self.eval_every < 0:
            raise UsageError(f"trainer.eval_every must be at least 0, not {self.eval_every}")
        if self.preempt_grace_s < 0:
            raise UsageError(f"trainer.preempt_grace_s must be at least 0, not {self.preempt_grace_s}")
        if self.sequence_parallel < 1:
            raise UsageError(f"trainer.sequence_parallel must be at least 1, not {self.sequence_parallel}")
        if self.fresh_optimizer and not self.start_phase:
            raise UsageError("trainer.fresh_optimizer starts a later phase from weights alone: set trainer.start_phase")
        if self.continue_from and self.init_from:
            raise UsageError("set trainer.continue_from (a run to carry on) or trainer.init_from (weights), not both")


@dataclass
class TrainJobConfig:
    """All of `configs/pretrain.yaml` (and `sft.yaml`), key for key: an unknown key anywhere is an error."""

    tokenizer: str = MISSING
    model: dict[str, Any] = field(default_factory=dict)  # configs/model/*.yaml (Step3VLConfig checks it)
    processor: dict[str, Any] = field(default_factory=dict)  # configs/processor/*.yaml
    data: dict[str, Any] = field(default_factory=dict)  # configs/data/ and the recipes (DataConfig checks it)
    optim: OptimConfig = field(default_factory=OptimConfig)
    deepspeed: dict[str, Any] = field(default_factory=dict)
    compute: ComputeConfig = field(default_factory=ComputeConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    phases: dict[str, PhaseConfig] = field(default_factory=dict)  # the run's later phases, by name
