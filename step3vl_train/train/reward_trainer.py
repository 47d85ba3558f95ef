"""Reward-model training: the pre-training loop (train/trainer.py) on preference pairs, with a value head and
the Bradley-Terry loss, plus held-out evaluation. Its checkpoints, resume, metrics and W&B are the loop's.

Rank roles are the loop's; in addition every rank evaluates its slice of the held-out pairs, and the
figures are summed over ranks. The reward statistics an export carries (`reward_stats.json`) are the
last evaluation's, or without held-out pairs the last step's batch; they are saved with each checkpoint.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field

import torch
import torch.distributed as dist

from step3vl_train.model.flops import StepFlops, batch_flops
from step3vl_train.model.value import Step3VLForValue
from step3vl_train.processing.processor import IGNORE_INDEX, ProcessedSample
from step3vl_train.train.config import TrainerConfig, TrainJobConfig
from step3vl_train.train.distributed import until_every_rank_is_done
from step3vl_train.train.reward_data import PairDataConfig, PairLoader
from step3vl_train.train.reward_model import Pair, PairBatch, RewardStats, bradley_terry_loss, pair_batch, pair_scores
from step3vl_train.train.trainer import Trainer, backward_step
from step3vl_train.usage import UsageError

# What `pair_sums` adds up, in order: the figures of a step or an evaluation come from these sums.
SUMS = ("pairs", "loss", "correct", "margin", "score", "score_squared")


@dataclass
class RMLossConfig:
    """The `rm:` block: -log sigmoid(r_c - r_r - margin) + centring_weight * (r_c + r_r)^2, per pair."""

    margin: float = 0.0
    centring_weight: float = 0.01


@dataclass
class RewardTrainerConfig(TrainerConfig):
    def __post_init__(self) -> None:
        super().__post_init__()
        if self.predict_every:
            raise UsageError("trainer.predict_every must be 0 for a reward model, which does not generate")
        if self.sequence_parallel != 1:
            raise UsageError("trainer.sequence_parallel must be 1 for a reward model: its rows are pairs, not packed")


@dataclass
class RewardJobConfig(TrainJobConfig):
    """All of `configs/train_rm.yaml`, key for key (`data` is checked by PairDataConfig)."""

    trainer: RewardTrainerConfig = field(default_factory=RewardTrainerConfig)
    rm: RMLossConfig = field(default_factory=RMLossConfig)

    def __post_init__(self) -> None:
        if self.phases:
            raise UsageError("phases: a reward model trains in one phase, on one mixture of pairs")


def pair_sums(chosen: torch.Tensor, rejected: torch.Tensor, losses: torch.Tensor) -> torch.Tensor:
    """(P,) scores and losses -> the float64 sums named by SUMS."""
    scores = torch.cat([chosen, rejected]).double()
    return torch.stack(
        [
            torch.tensor(float(len(chosen)), dtype=torch.float64, device=chosen.device),
            losses.double().sum(),
            (chosen > rejected).double().sum(),
            (chosen - rejected).double().sum(),
            scores.sum(),
            (scores**2).sum(),
        ]
    )


def pair_figures(sums: list[float]) -> dict:
    """Mean loss, pairwise accuracy, mean margin r_c - r_r, and the mean and std of all 2P scores."""
    totals = dict(zip(SUMS, sums, strict=True))
    pairs = max(totals["pairs"], 1.0)
    mean = totals["score"] / (2 * pairs)
    return {
        "loss": totals["loss"] / pairs,
        "accuracy": totals["correct"] / pairs,
        "margin": totals["margin"] / pairs,
        "reward_mean": mean,
        "reward_std": math.sqrt(max(totals["score_squared"] / (2 * pairs) - mean**2, 0.0)),
        "pairs": int(totals["pairs"]),
    }


def stats_of(figures: dict, origin: str, step: int) -> RewardStats:
    return RewardStats(figures["reward_mean"], figures["reward_std"], origin, step, figures["pairs"])


def pair_forward(
    engine, loss: RMLossConfig, stand_in: PairBatch
) -> Callable[[PairBatch | None], tuple[torch.Tensor, torch.Tensor]]:
    """`backward_step`'s forward for the Bradley-Terry loss: the summed loss of the batch's pairs, and the
    SUMS and tokens (a None batch runs `stand_in`, counting nothing)."""
    device = engine.device

    def forward(batch: PairBatch | None) -> tuple[torch.Tensor, torch.Tensor]:
        counted = batch is not None
        batch = batch if batch is not None else stand_in
        values = engine(**batch.batch.model_inputs(with_labels=False, device=device, pixel_dtype=engine.module.dtype))
        chosen, rejected = pair_scores(values, batch)
        losses = bradley_terry_loss(chosen, rejected, loss.margin, loss.centring_weight) * counted
        tokens = batch.batch.attention_mask.sum().to(device, torch.float64)
        sums = torch.cat([pair_sums(chosen.detach(), rejected.detach(), losses.detach()), tokens[None]])
        return losses.sum(), sums * counted

    return forward


class RewardModelTrainer(Trainer):
    job_config = RewardJobConfig
    data_config = PairDataConfig
    model_class = Step3VLForValue

    def __init__(self, cfg):
        super().__init__(cfg)
        self.loss = self.job.rm
        self.reward_stats: RewardStats | None = None  # what an export of the latest checkpoint carries
        self.last_batch: dict | None = None  # the last step's figures

    def build_loader(self, data: PairDataConfig) -> PairLoader:
        rank, world = self.data_rank.rank, self.data_rank.world
        self.held_out = PairLoader(data, self.processor, rank, world, held_out=True) if data.eval else None
        return PairLoader(data, self.processor, rank, world)

    def build_validation(self, data: PairDataConfig) -> None:
        return None  # the held-out pairs (data.eval) are scored by `evaluate`, from `after_step`

    def micro_batches(self) -> Iterator[PairBatch]:
        return iter(self.loader)

    def backward(self, micro: Iterable[PairBatch | None], figures: Callable[[], list[float]]) -> torch.Tensor:
        """The mean loss over every pair of the global batch (backward_step divides by the pairs)."""
        forward = pair_forward(self.ds.engine, self.loss, self.stand_in_pair())
        count, reference = self.trainer.grad_accum, self.step_reference()
        return backward_step(self.ds.engine, micro, count, reference, forward, figures)

    def step_reference(self) -> float:
        """The pairs a step holds at most."""
        return float(self.trainer.grad_accum * self.data_rank.world * self.data.micro_batch_size)

    def step_metrics(self, totals: list[float]) -> dict:
        self.last_batch = pair_figures(totals[: len(SUMS)])
        return {**self.last_batch, "step_tokens": int(totals[len(SUMS)])}

    def after_step(self, final: bool) -> dict:
        step = self.progress.step
        if self.held_out is None:
            if self.last_batch is not None:
                self.reward_stats = stats_of(self.last_batch, "train", step)
            return {}
        due = final or (self.trainer.eval_every and step % self.trainer.eval_every == 0)
        if not due or (self.reward_stats is not None and self.reward_stats.step == step):
            return {}
        figures = self.evaluate()
        self.reward_stats = stats_of(figures, "eval", step)
        self.say(
            f"held-out pairs at step {step}: accuracy {figures['accuracy']:.3f}, margin {figures['margin']:.3f}, "
            f"reward {figures['reward_mean']:.3f} +- {figures['reward_std']:.3f} over {figures['pairs']} pairs"
        )
        return {f"eval/{name}": value for name, value in figures.items()}

    @torch.no_grad()
    def evaluate(self) -> dict:
        """The held-out pairs' figures, every rank scoring its slice. Each forward is a collective (ZeRO-3
        gathers the weights), so a rank whose pairs have run out scores a one-token stand-in until every
        rank's have."""
        engine, device = self.ds.engine, self.device
        engine.eval()
        self.held_out.rewind()
        sums = torch.zeros(len(SUMS), dtype=torch.float64, device=device)
        for batch in until_every_rank_is_done(self.held_out, device):
            inputs = (batch or self.stand_in_pair()).batch.model_inputs(
                with_labels=False, device=device, pixel_dtype=engine.module.dtype
            )
            values = engine(**inputs)
            if batch is not None:
                chosen, rejected = pair_scores(values, batch)
                losses = bradley_terry_loss(chosen, rejected, self.loss.margin, self.loss.centring_weight)
                sums += pair_sums(chosen, rejected, losses)
        dist.all_reduce(sums)
        engine.train()
        stats = self.held_out.stats()
        skipped = torch.tensor(float(sum(stats.skips.values())), device=device)
        dist.all_reduce(skipped)
        return {**pair_figures(sums.tolist()), "skipped": int(skipped)}

    def stand_in_pair(self) -> PairBatch:
        pad = self.loader.pad_token_id
        row = ProcessedSample(
            torch.tensor([pad]), torch.tensor([IGNORE_INDEX]), None, [], torch.zeros(0, dtype=torch.bool)
        )
        return pair_batch([Pair("stand-in", row, row)], pad)

    def flops(self, batch: PairBatch) -> StepFlops:
        """The loop's count with this model's head: one wide, at every token."""
        rows = batch.batch
        tokens = int(rows.attention_mask.sum())
        return batch_flops(
            self.model_config, rows.input_ids, rows.position_ids, rows.attention_mask, rows.view_sides(), tokens, 1
        )

    def state_dict(self) -> dict:
        stats = asdict(self.reward_stats) if self.reward_stats is not None else None
        return {**super().state_dict(), "reward_stats": stats}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.reward_stats = RewardStats(**state["reward_stats"]) if state.get("reward_stats") else None
