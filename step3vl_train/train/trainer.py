"""The pre-training / SFT loop: packed batches -> DeepSpeed ZeRO-3 -> checkpoints and metrics.

Rank roles, in one place: rank 0 decides the run directory, writes config.yaml, metrics.jsonl and the
`latest` pointer; every rank reads its own slice of the data and saves its own loader and RNG state, and
validates its own share of the validation set (train/validation.py).

A stage that trains another model on other batches with the same loop (the reward model,
train/reward_trainer.py) subclasses `Trainer` and replaces its parts: the config classes, `model_class`,
`build_loader`, `build_validation`, `micro_batches`, `backward` with `step_metrics`, `after_step`, `flops`
and the state kept in checkpoints.
"""

from __future__ import annotations

import json
import math
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TypeVar

import torch
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from step3vl_train.data.config import DataConfig
from step3vl_train.data.files import check_source_files
from step3vl_train.data.loader import PackedLoader
from step3vl_train.data.skips import SKIP_REASONS
from step3vl_train.model import Step3VLConfig, Step3VLForConditionalGeneration
from step3vl_train.model.flops import StepFlops, batch_flops, device_peak_flops
from step3vl_train.processing.processor import IGNORE_INDEX, Batch, load_processor
from step3vl_train.train.checkpoint import Checkpointer
from step3vl_train.train.config import TrainerConfig, TrainJobConfig
from step3vl_train.train.config_changes import changes_since_checkpoint
from step3vl_train.train.distributed import close_distributed, init_distributed
from step3vl_train.train.engine import build_engine, deepspeed_config, scale_gradients
from step3vl_train.train.metrics import MetricsLog, truncate_jsonl
from step3vl_train.train.optim import apply_hyperparameters
from step3vl_train.train.phases import Phase, phase_at, phase_named, run_phases, schedule_legs
from step3vl_train.train.predictions import answer_prompts, resolve_prompt_paths
from step3vl_train.train.preemption import Preempted, StopRequest
from step3vl_train.train.run_lock import lock_on_rank_zero
from step3vl_train.train.schedule import apply_schedule
from step3vl_train.train.sequence_parallel import DataParallelRank, GroupLoader, data_parallel_rank
from step3vl_train.train.validation import Validation, stand_in_batch, summary
from step3vl_train.usage import UsageError, build

REPO = Path(__file__).resolve().parents[2]
T = TypeVar("T")
CONFIG_FILE = "config.yaml"  # the resolved config, in the run directory and in each checkpoint


@dataclass
class Progress:
    step: int = 0
    tokens: int = 0  # real (non-padding) tokens trained on, all ranks
    evaluated: int = 0  # the last step validated: a resume that finds the data run out does not repeat it


def agreed_run_dir(output_dir: str) -> Path:
    """Rank 0's choice of run directory, sent to the others (per-rank Hydra timestamps may differ)."""
    chosen = [str(Path(output_dir).resolve())] if dist.get_rank() == 0 else [None]
    dist.broadcast_object_list(chosen, src=0)
    return Path(chosen[0])


def supervised_tokens(batch: Batch) -> int:
    """Targets the loss counts: labels past the first position (the loss is shifted by one)."""
    return int((batch.labels[:, 1:] != IGNORE_INDEX).sum())


@dataclass
class DataWait:
    """The seconds a step has spent waiting for its micro-batches."""

    seconds: float = 0.0


def arriving(batches: Iterator[T], count: int, wait: DataWait) -> Iterator[T | None]:
    """The next `count` items of `batches`, each as soon as it is made, then None for each one missing once
    `batches` has run out; the time spent waiting for them is added to `wait`."""
    for _ in range(count):
        started = time.perf_counter()
        item = next(batches, None)
        wait.seconds += time.perf_counter() - started
        yield item


def backward_step(
    engine,
    micro: Iterable[T | None],
    count: int,
    reference: float,
    forward: Callable[[T | None], tuple[torch.Tensor, torch.Tensor]],
    figures: Callable[[], list[float]] = list,
) -> torch.Tensor:
    """Forward and backward over this rank's `count` micro-batches of one optimizer step, each as soon as it
    arrives, leaving the update (`engine.step()`) to the caller.

    `forward(batch)` returns the batch's summed loss and the float64 sums it adds to the step's, on the
    device, the loss's normaliser first (supervised tokens, pairs); a None batch (this rank's data ran out
    before the step's end) it replaces with a stand-in that counts nothing, so that this rank still joins
    the others' collectives. The step's loss is the sum over every micro-batch of every rank divided by the
    normaliser summed alike, whatever the split into ranks, micro-batches, packs and sequence slices; that
    normaliser is known only once the step's last micro-batch is made, so each micro-batch goes backward
    divided by a fixed `reference` instead, and the accumulated gradients are scaled by
    reference / normaliser before the update (engine.scale_gradients). DeepSpeed averages gradients over
    every rank of the ZeRO group, sequence-parallel ranks included (engine.check_gradient_reduce), hence
    the factor of the world size.

    Returns the sums over all ranks as one float64 tensor on the device, then the count of missing
    micro-batches and this rank's `figures()` (taken after the last micro-batch), summed likewise in the
    same all-reduce: reading it is the step's one host synchronisation before the update."""
    scale = dist.get_world_size() / reference
    sums, missing = None, 0
    for index, batch in enumerate(micro):
        loss, here = forward(batch)
        engine.backward(loss * scale, scale_wrt_gas=False)
        if index < count - 1:
            engine.step()  # DeepSpeed counts micro-steps; only the last one updates
        sums = here if sums is None else sums + here
        missing += batch is None
    sums = torch.cat([sums, sums.new_tensor([missing, *figures()])])
    dist.all_reduce(sums)
    scale_gradients(engine, reference / sums[0].clamp(min=1))
    return sums


def language_model_forward(
    engine, data: DataParallelRank, stand_in: Batch
) -> Callable[[Batch | None], tuple[torch.Tensor, torch.Tensor]]:
    """`backward_step`'s forward for the language-model loss: the summed token loss of this rank's part of
    the batch, and (supervised tokens, the loss, tokens). Every tensor goes to the engine's device here,
    batches from pinned memory, and the collectives run there (NCCL takes no CPU tensor). The ranks of a
    sequence-parallel group share rows, so only the first counts their tokens."""
    device = engine.device

    def forward(batch: Batch | None) -> tuple[torch.Tensor, torch.Tensor]:
        counted = batch is not None and data.counts
        batch = batch if batch is not None else stand_in
        inputs = batch.model_inputs(device=device, pixel_dtype=engine.module.dtype)
        loss = engine(**inputs, num_items_in_batch=1).loss
        targets, tokens = (supervised_tokens(batch), int(batch.attention_mask.sum())) if counted else (0, 0)
        counts = torch.tensor([targets, tokens], dtype=torch.float64, device=device)
        return loss, torch.stack([counts[0], loss.detach().double(), counts[1]])

    return forward


def backward_global_batch(
    engine,
    micro: Iterable[Batch | None],
    count: int,
    data: DataParallelRank,
    reference: float,
    stand_in: Batch,
    figures: Callable[[], list[float]] = list,
) -> torch.Tensor:
    """`backward_step` with the language-model loss; returns (supervised tokens, loss, tokens, missing
    micro-batches, *figures), summed over all ranks."""
    forward = language_model_forward(engine, data, stand_in)
    return backward_step(engine, micro, count, reference, forward, figures)


def progress_figures(row: dict) -> dict[str, str]:
    """What the progress bar shows of a step's row: the loss, tokens/s, and the wait for data where it is
    over 5% of the step."""
    shown = {"loss": f"{row['loss']:.4f}", "tok_s": f"{row['tokens_per_s']:,.0f}"}
    if row["time/data_wait"] > 0.05 * row["time/step"]:
        shown["data_wait"] = f"{row['time/data_wait'] / row['time/step']:.0%}"
    return shown


def trained_tokens(checkpoint: Path) -> int:
    """The tokens a run had trained when it wrote `checkpoint` (every rank's progress is the same)."""
    return torch.load(checkpoint / "trainer_rank0.pt", weights_only=True)["progress"]["tokens"]


def starting_checkpoint(own: Checkpointer, trainer: TrainerConfig, phases: list[Phase]) -> Checkpointer | None:
    """Where a run's state comes from: its own latest checkpoint, or a fresh run's `continue_from`'s; None
    for a fresh start (init_from's weights, or random ones). Refuses a start the recipe rules out."""
    index = phase_named(phases, trainer.start_phase) if trainer.start_phase else 0
    if own.latest() is not None:
        return own
    if trainer.continue_from:
        source = Checkpointer(trainer.continue_from, keep_last=0)
        latest = source.latest()
        if latest is None:
            raise UsageError(f"trainer.continue_from={trainer.continue_from} has no checkpoint to continue")
        if trainer.start_phase:
            tokens = trained_tokens(latest)
            if phase_at(phases, tokens) != index:
                raise UsageError(
                    f"{latest} has trained {tokens:,} tokens and phase {trainer.start_phase} starts at "
                    f"{phases[index].start_tokens:,}: resume that run to the end of the phase before it"
                )
        return source
    if trainer.start_phase and not trainer.fresh_optimizer:
        raise UsageError(
            f"phase {trainer.start_phase} carries on the run before it: set trainer.continue_from to that run's "
            "directory (its optimizer state and data position go on), or trainer.init_from to an export "
            "with trainer.fresh_optimizer=true (a new optimizer, and the data read again from the start)"
        )
    if trainer.requires_init_from and not trainer.init_from and not trainer.from_scratch:
        raise UsageError(
            "this recipe starts from trained weights: set trainer.init_from to them (the earlier stage's "
            "export), or trainer.from_scratch=true for random ones"
        )
    return None


class Trainer:
    job_config: type[TrainJobConfig] = TrainJobConfig
    data_config: type = DataConfig
    model_class: type[Step3VLForConditionalGeneration] = Step3VLForConditionalGeneration

    def __init__(self, cfg: DictConfig):
        job = build(self.job_config, cfg)  # every key checked before any rank starts work
        self.cfg, self.job = cfg, job
        self.trainer, self.optim = job.trainer, job.optim
        try:
            model_config = Step3VLConfig.from_dict(job.model)
        except ValueError as error:
            raise UsageError(f"model: {error}") from error
        self.model_config = model_config
        self.logging = job.logging
        data = build(self.data_config, job.data, "data.")
        check_source_files("data", data.root, {"sources": data.sources, "eval": data.eval})  # before any work
        self.processor = load_processor(job.tokenizer, job.processor)
        init_distributed()
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.run_dir = agreed_run_dir(self.trainer.output_dir)
        self.run_lock = lock_on_rank_zero(self.run_dir)
        torch.manual_seed(self.trainer.seed)
        self.data_rank = data_parallel_rank(self.trainer.sequence_parallel)
        ds_config = deepspeed_config(
            job.deepspeed,
            data.micro_batch_size,
            self.trainer.grad_accum,
            self.trainer.grad_clip,
            torch.cuda.is_available() if self.trainer.bf16 is None else self.trainer.bf16,
        )
        phases = job.phases
        if data.train:  # the user's shards, one source, replace every phase's mixture; the lr legs stay
            phases = {name: replace(phase, weights={}) for name, phase in phases.items()}
        self.phases = run_phases(data.sources, phases)
        self.checkpointer = Checkpointer(self.run_dir, self.trainer.keep_last)
        # A run with a checkpoint resumes from it; a fresh one starts from continue_from's, or init_from.
        self.source = starting_checkpoint(self.checkpointer, self.trainer, self.phases)
        self.config_changes = self.check_starting_checkpoint()
        init_from = self.trainer.init_from if self.source is None else None
        started = time.monotonic()
        self.say(
            f"building the model and starting DeepSpeed ZeRO-3 (world size {self.world})"
            + (f" from {init_from}" if init_from else "")
        )
        self.ds = build_engine(
            model_config,
            self.optim,
            ds_config,
            init_from,
            self.model_class,
            compute=job.compute,
            sequence_parallel=self.trainer.sequence_parallel,
        )
        self.device = self.ds.engine.device
        if self.trainer.gradient_checkpointing:
            self.ds.model.gradient_checkpointing_enable()
        self.data = data
        sources = ", ".join(source.name for source in data.sources)
        self.say(f"model ready in {time.monotonic() - started:.0f} s; starting the data loaders ({sources})")
        self.loader = self.build_loader(data)
        self.validation = self.build_validation(data)
        self.progress = Progress()
        self.data_position: dict | None = None  # the loader's state to save, where not its live one
        self.stand_in = stand_in_batch(self.processor.tokenizer.pad_token_id or 0)  # for a rank out of data
        self.step_keys: list[str] = []  # this step's sample keys, for trainer.log_sample_keys
        self.stop = StopRequest(self.trainer.preempt_grace_s)  # SIGTERM, while the loop runs
        self.stopping = False  # every rank has agreed to stop after this step (a SIGTERM reached one)
        self.save_s: float | None = None  # how long this run's last save took
        self.peak_flops = self.trainer.peak_flops_per_device or device_peak_flops()
        if self.device.type == "cuda" and not self.peak_flops:
            self.say(f"no MFU: {torch.cuda.get_device_name()} has no known peak; set trainer.peak_flops_per_device")

    def check_starting_checkpoint(self) -> list[str]:
        """That the checkpoint the run starts from was written by this many ranks, and the changed config
        keys a resume from it applies (refused ones raise), against the config it was written with."""
        latest = self.source.latest() if self.source is not None else None
        if latest is None:
            return []
        saved_world = len(list(latest.glob("trainer_rank*.pt")))
        if saved_world != self.world:
            raise UsageError(
                f"{latest} was written by {saved_world} ranks and this run has {self.world}: resume with "
                f"{saved_world} ranks, or start a new run from its export (python launch/export_hf.py "
                f"checkpoint={latest} out=DIR, then trainer.init_from=DIR), which keeps the weights but not the "
                "optimizer state or the data position"
            )
        if not (latest / CONFIG_FILE).is_file():
            return []
        saved = OmegaConf.to_container(OmegaConf.load(latest / CONFIG_FILE))
        current = OmegaConf.to_container(self.cfg, resolve=True)
        return changes_since_checkpoint(saved, current, trained_tokens(latest))

    def build_loader(self, data: DataConfig) -> PackedLoader | GroupLoader:
        """Over the data-parallel ranks. The ranks of a sequence-parallel group share rows: the group's
        first rank reads and decodes them, with the group's CPUs, and hands each rank its views."""
        weights = [phase.weights for phase in self.phases]
        sequence_parallel = self.trainer.sequence_parallel
        loader = None
        if self.data_rank.counts:
            rank, world = self.data_rank.rank, self.data_rank.world
            loader = PackedLoader(data, self.processor, rank, world, weights, cpu_share=sequence_parallel)
        if sequence_parallel == 1:
            return loader
        model = self.ds.model
        group = model.runtime.sequence_group
        return GroupLoader(loader, group, self.model_config.image_token_id, model.tokens_per_view)

    def step_reference(self) -> float:
        """`backward_step`'s fixed normaliser: the supervised tokens a step could hold at most."""
        data = self.data
        return float(self.trainer.grad_accum * self.data_rank.world * data.micro_batch_size * data.packing.seq_len)

    def build_validation(self, data: DataConfig) -> Validation | None:
        return Validation(data, self.processor, self.trainer.eval_every) if data.eval else None

    def micro_batches(self) -> Iterator[Batch]:
        """This rank's micro-batches, in order, for `backward`; their sample keys go to `step_keys`."""
        for packed in self.loader:
            self.step_keys += [key for row in packed.keys for key in row]
            yield packed.batch

    def enter_phase(self) -> bool:
        """Hands the loader the phase the run's tokens are in; whether that changed it."""
        index = phase_at(self.phases, self.progress.tokens)
        if len(self.phases) == 1 or index == self.loader.phase:
            return False
        self.loader.enter_phase(index)
        phase = self.phases[index]
        self.say(f"phase {phase.name} from {self.progress.tokens:,} tokens (it starts at {phase.start_tokens:,})")
        return True

    def resume(self) -> None:
        if self.source is None:
            if self.trainer.fresh_optimizer:
                start = self.phases[phase_named(self.phases, self.trainer.start_phase)].start_tokens
                self.progress = Progress(tokens=start)
                self.say(f"starting at phase {self.trainer.start_phase} with a new optimizer, data from the start")
            self.enter_phase()
            return
        latest = self.source.latest()
        self.load_state_dict(self.source.load(self.ds.engine))
        apply_hyperparameters(self.ds.engine.optimizer, self.optim)
        for change in self.config_changes:
            self.say(f"changed since the checkpoint, applied: {change}")
        self.say(f"resumed from {self.position()}: {latest}")
        self.enter_phase()

    def run(self) -> None:
        self.resume()
        if self.rank == 0:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            OmegaConf.save(self.cfg, self.run_dir / CONFIG_FILE, resolve=True)
        if self.trainer.log_sample_keys:
            self.sample_keys_path.parent.mkdir(parents=True, exist_ok=True)
            truncate_jsonl(self.sample_keys_path, self.progress.step)
        if self.finished():
            self.say(f"{self.run_dir} has already finished: {self.position()}. Raise trainer.max_steps to go on.")
        else:
            self.train_to_the_end()
        dist.barrier()  # every rank past its last collective before `close` tears the group down

    def train_to_the_end(self) -> None:
        metrics = None
        if self.rank == 0:
            metrics = MetricsLog(
                self.run_dir, self.progress.step, self.logging, OmegaConf.to_container(self.cfg, resolve=True)
            )
        try:
            with self.stop.installed():
                self.loop(metrics)
        finally:
            if metrics is not None:
                metrics.close()
        self.report_skips()
        latest = self.checkpointer.latest()
        self.say(f"finished: {self.position()}" + (f"; the last checkpoint is {latest}" if latest else ""))

    def loop(self, metrics: MetricsLog | None) -> None:
        batches = self.micro_batches()
        bar = tqdm(total=self.trainer.max_steps, initial=self.progress.step, disable=self.rank != 0, unit="step")
        self.ds.engine.train()
        try:
            while not self.finished():
                if self.enter_phase():  # the workers restart in the new phase: a new iterator
                    batches.close()
                    batches = self.micro_batches()
                row = self.train_step(batches)
                if row is None:  # with data.max_epochs a rank can run out first; every rank stops together
                    if self.progress.step == 0:
                        self.report_skips()
                        raise UsageError(
                            "the data ran out before the first step: no sample could be packed (the skips are "
                            f"above, and in {self.run_dir / 'data_skips.json'}). Check data.sources or data.train, "
                            "and data.max_epochs"
                        )
                    self.say(f"the data ran out after step {self.progress.step}")
                    last = self.after_step(final=True)
                    if metrics is not None and last:
                        metrics.write({"step": self.progress.step, **last})
                    if self.trainer.save_every:
                        self.save()
                    break
                self.write_sample_keys()
                bar.set_postfix(progress_figures(row), refresh=False)
                bar.update(1)
                figures = self.after_step(final=self.finished())
                row |= figures
                if metrics is not None and (self.progress.step % self.trainer.log_every == 0 or figures):
                    metrics.write(row)
                if self.trainer.predict_every and self.progress.step % self.trainer.predict_every == 0:
                    prompts = resolve_prompt_paths(self.trainer.predict_prompts, REPO)
                    rows = answer_prompts(
                        self.ds.engine.module, self.processor, prompts, self.trainer.predict_max_new_tokens, self.device
                    )
                    if metrics is not None:
                        metrics.predictions(self.progress.step, rows)
                save_every = self.trainer.save_every
                if save_every and (self.progress.step % save_every == 0 or self.finished()):
                    self.save()
                if self.stopping and not self.finished():
                    self.stop_here()
        finally:
            bar.close()

    def stop_here(self) -> None:
        """After a SIGTERM, at the step every rank agreed on (`train_step`): saves that step where the save
        fits in what is left of trainer.preempt_grace_s, by the earliest signal and the slowest rank's last
        save (the first save of a run is always tried), then raises `Preempted` on every rank."""
        if self.trainer.save_every and not self.checkpointer.published(self.progress.step):
            last_save = self.save_s if self.save_s is not None else -1.0
            timing = torch.tensor([self.stop.elapsed(), last_save], dtype=torch.float64, device=self.device)
            dist.all_reduce(timing, op=dist.ReduceOp.MAX)
            elapsed, save_s = timing.tolist()
            if self.stop.save_fits(save_s if save_s >= 0 else None, elapsed):
                self.save()
            else:
                left = self.stop.grace_s - elapsed
                self.say(f"not saving step {self.progress.step}: the last save took {save_s:.0f} s, and {left:.0f} s "
                         "of trainer.preempt_grace_s are left")  # fmt: skip
        dist.barrier()
        raise Preempted(f"stopped by SIGTERM at {self.position()}")

    @property
    def sample_keys_path(self) -> Path:
        return self.run_dir / "samples" / f"rank{self.rank}.jsonl"

    def write_sample_keys(self) -> None:
        """This rank's sample keys of the step just taken, with trainer.log_sample_keys."""
        if self.trainer.log_sample_keys:
            with self.sample_keys_path.open("a") as handle:
                handle.write(json.dumps({"step": self.progress.step, "keys": self.step_keys}) + "\n")
        self.step_keys = []

    def say(self, line: str) -> None:
        """One line from rank 0, between progress-bar refreshes."""
        if self.rank == 0:
            tqdm.write(line)

    def position(self) -> str:
        """Where the run stands against its end: `step 20 (of 30)`, with tokens when they end it."""
        steps, tokens = self.trainer.max_steps, self.trainer.max_tokens
        line = f"step {self.progress.step}" + (f" (of {steps})" if steps is not None else "")
        if tokens is not None:
            line += f", {self.progress.tokens:,} tokens"
            pace = self.progress.tokens / max(self.progress.step, 1)
            if steps is None or pace * steps >= tokens:  # not where max_steps ends the run first (a CPU form)
                line += f" (of {tokens:,})"
        return line

    def close(self) -> None:
        """`run` ends with a barrier when it succeeds; a rank that fails leaves without waiting for the
        others, which torchrun then stops."""
        if self.run_lock is not None:
            self.run_lock.release()
        close_distributed(wait_for_peers=False)

    def report_skips(self) -> None:
        """The run's skipped samples by reason, over all ranks: distinct bad samples, and how often they were
        met (a bad sample in a small source is met once a pass). Logged by rank 0, and in data_skips.json."""
        skips = self.loader.stats().skips if self.data_rank.counts else {}
        counts = torch.tensor([skips.get(r, 0) for r in SKIP_REASONS], dtype=torch.float64, device=self.device)
        dist.all_reduce(counts)
        keys = [None] * self.world
        dist.all_gather_object(keys, self.loader.skipped_keys() if self.data_rank.counts else {})
        if self.rank == 0:
            met = {reason: int(n) for reason, n in zip(SKIP_REASONS, counts.tolist(), strict=True) if n}
            reasons = {key: reason for rank_keys in keys for key, reason in rank_keys.items()}
            distinct = Counter(reasons.values())
            shards = sorted(key for key, reason in reasons.items() if reason == "unreadable_shard")
            skips = {"samples": distinct, "met": met, "unreadable_shards": shards}
            (self.run_dir / "data_skips.json").write_text(json.dumps(skips, indent=1))
            report = ", ".join(f"{reason}: {distinct[reason]} (met {n} times)" for reason, n in met.items())
            self.say(f"skipped samples by reason: {report or 'none'}")
            for shard in shards:
                self.say(f"unreadable shard: {shard}")

    def finished(self) -> bool:
        steps, tokens = self.trainer.max_steps, self.trainer.max_tokens
        return (steps is not None and self.progress.step >= steps) or (
            tokens is not None and self.progress.tokens >= tokens
        )

    def backward(self, micro: Iterable[Batch | None], figures: Callable[[], list[float]]) -> torch.Tensor:
        """Forward and backward over this rank's micro-batches of a step as they arrive (all but the
        update); returns the step's sums over all ranks as one tensor on the device, for `step_metrics`,
        then the count of missing micro-batches and `figures()` summed (`backward_step`)."""
        count, reference = self.trainer.grad_accum, self.step_reference()
        return backward_global_batch(self.ds.engine, micro, count, self.data_rank, reference, self.stand_in, figures)

    def step_metrics(self, totals: list[float]) -> dict:
        """The row's figures from `backward`'s sums: `loss` and `step_tokens` (all ranks) at least."""
        global_targets, loss_sum, global_tokens = totals
        loss = loss_sum / max(global_targets, 1)
        return {"loss": loss, "step_tokens": int(global_tokens), "supervised_tokens": int(global_targets)}

    def after_step(self, final: bool) -> dict:
        """Called on every rank after each step (`final`: the run's last), and once more with `final` when
        the data runs out; before the step is logged and saved. Returns figures for its metrics row (a row
        with any is written whatever trainer.log_every): here the validation's, when one is due."""
        step = self.progress.step
        if self.validation is None or not self.validation.due(step, final) or self.progress.evaluated == step:
            return {}
        figures = self.validation.run(self.ds.engine)
        self.progress.evaluated = step
        self.say(f"validation at step {step}: {summary(figures)}")
        return figures

    def train_step(self, batches: Iterator[Batch]) -> dict | None:
        """One optimizer step over `grad_accum` micro-batches per rank, each going forward as soon as it
        arrives; None, with no update, when some rank's data ran out before the step's end."""
        started = time.perf_counter()
        if self.data.max_epochs is not None:  # the data can run out: what a step it cuts short saves
            self.data_position = self.loader.state_dict()
        legs = schedule_legs(self.phases)
        lrs = apply_schedule(self.ds.engine.optimizer, self.progress.tokens, self.optim.schedule, legs)
        phase = {"phase": self.loader.phase} if len(self.phases) > 1 else {}
        wait, flops = DataWait(), []
        micro = self.counting_flops(arriving(batches, self.trainer.grad_accum, wait), flops)
        totals = self.backward(micro, lambda: self.step_figures(flops)).tolist()
        step_totals, (missing, samples, skipped, *flop_sums, stop) = totals[:-7], totals[-7:]
        self.stopping = stop > 0
        if missing:
            return None
        self.data_position = None
        self.ds.engine.step()
        figures = self.step_metrics(step_totals)
        grad_norm = self.ds.engine.get_global_grad_norm()
        seconds = time.perf_counter() - started  # waits for data included: the GPU idles through them
        self.progress.step += 1
        self.progress.tokens += figures["step_tokens"]
        return {
            "step": self.progress.step,
            "loss": figures.pop("loss"),
            "lr": next(iter(lrs.values())),
            **{f"lr/{name}": lr for name, lr in lrs.items()},
            "grad_norm": float(grad_norm) if grad_norm is not None and math.isfinite(grad_norm) else None,
            "tokens": self.progress.tokens,
            **phase,
            **figures,
            "samples": int(samples),
            "skipped_samples": int(skipped),
            "tokens_per_s": round(figures["step_tokens"] / seconds, 1),
            "time/step": seconds,
            "time/data_wait": wait.seconds,
            **self.utilisation(StepFlops(*flop_sums), seconds),
            **self.memory(),
        }

    def step_figures(self, flops: list[StepFlops]) -> list[float]:
        """This rank's samples and skips so far and the step's FLOPs (ViT, decoder, dense decoder), which
        `backward_step` sums over the ranks with the step's own sums (the first rank of a sequence-parallel
        group counts for it); then 1 where this rank has had a SIGTERM: a sum above 0 stops every rank after
        this step, in the step's one all-reduce (ranks may receive the signal at different steps)."""
        data = self.loader.stats().summary() if self.data_rank.counts else {"samples": 0, "skipped_samples": 0}
        flop_sums = [sum(f.vit for f in flops), sum(f.decoder for f in flops), sum(f.decoder_dense for f in flops)]
        return [data["samples"], data["skipped_samples"], *flop_sums, float(self.stop.requested)]

    def counting_flops(self, micro: Iterator[T | None], flops: list[StepFlops]) -> Iterator[T | None]:
        """`micro` as it comes, each counted batch's FLOPs added to `flops` on the way (its first rank's
        alone in a sequence-parallel group)."""
        for batch in micro:
            if batch is not None and self.data_rank.counts:
                flops.append(self.flops(batch))
            yield batch

    def flops(self, batch: Batch) -> StepFlops:
        return batch_flops(
            self.model_config,
            batch.input_ids,
            batch.position_ids,
            batch.attention_mask,
            batch.view_sides(),
            supervised_tokens(batch),
        )

    def memory(self) -> dict:
        """This rank's peak of allocated GPU memory so far, and what the caching allocator holds."""
        if self.device.type != "cuda":
            return {}
        return {
            "memory/peak_gib": torch.cuda.max_memory_allocated(self.device) / 2**30,
            "memory/reserved_gib": torch.cuda.memory_reserved(self.device) / 2**30,
        }

    def utilisation(self, flops: StepFlops, seconds: float) -> dict:
        """FLOP/s of the step (its whole time, waits for data included), the ViT's apart, and MFU where the
        device's peak is known: `mfu` as torchtitan counts (the decoder's attention over whole rows, full
        square), `mfu/causal` and its parts as we do (causal attention within each sample); the head at the
        scored positions only, recomputation never (model/flops.py)."""
        vit, decoder = flops.vit, flops.decoder
        row = {"flops/vit": vit, "flops/decoder": decoder, "tflops_per_s": round((vit + decoder) / seconds / 1e12, 4)}
        if self.peak_flops:
            budget = self.peak_flops * self.world * seconds
            row |= {
                "mfu": (vit + flops.decoder_dense) / budget,
                "mfu/causal": (vit + decoder) / budget,
                "mfu/vit": vit / budget,
                "mfu/decoder": decoder / budget,
            }
        return row

    def state_dict(self) -> dict:
        """This rank's part of a checkpoint besides the weights, optimizer and RNGs."""
        loader = self.data_position if self.data_position is not None else self.loader.state_dict()
        return {"progress": vars(self.progress).copy(), "loader": loader}

    def load_state_dict(self, state: dict) -> None:
        self.progress = Progress(**state["progress"])
        self.loader.load_state_dict(state["loader"])

    def save(self) -> None:
        started = time.perf_counter()
        config = OmegaConf.to_yaml(self.cfg, resolve=True)
        self.checkpointer.save(self.ds.engine, self.progress.step, self.state_dict(), files={CONFIG_FILE: config})
        self.save_s = time.perf_counter() - started
