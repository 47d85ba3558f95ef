"""The scalar reward model: what it scores, its Bradley-Terry loss, and how an export is loaded and used.

A reply is scored as the conversation `messages + [the reply's final answer]` (the text after its last
`</think>`: reasoning is never judged), rendered by the processor with no generation prompt, read by
`Step3VLForValue` at the last token (`last_token_scores`). Training (train/reward_trainer.py) and the
reward-model service score through the same functions here, so a score means the same in both. Rows are
padded on the right, where `arange` position ids are the true ones; a score does not depend on padding
side, batch composition or the padding token (tests/train/test_reward_model.py).

An RM export is the released layout with `value_head.*` in place of `lm_head.*`, plus `reward_stats.json`:
the mean and std of raw scores the service normalises by.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from step3vl_train.model.value import Step3VLForValue, last_token_scores
from step3vl_train.processing.chat import answer_text
from step3vl_train.processing.processor import Batch, ProcessedSample, collate

REWARD_STATS = "reward_stats.json"


def reward_conversation(messages: list[dict], response: str) -> list[dict]:
    """`messages` (ending with the user's turn) and one assistant turn holding the response's final answer."""
    return [*messages, {"role": "assistant", "content": answer_text(response)}]


@dataclass
class Pair:
    """One preference pair, processed: both replies after the same prompt and images."""

    key: str
    chosen: ProcessedSample
    rejected: ProcessedSample


@dataclass
class PairBatch:
    """P pairs as 2P right-padded rows: the P chosen replies, then the P rejected ones, pair by pair."""

    batch: Batch  # (2P, L)
    keys: list[str]  # (P,)

    @property
    def pairs(self) -> int:
        return len(self.keys)


def pair_batch(pairs: list[Pair], pad_token_id: int) -> PairBatch:
    rows = [pair.chosen for pair in pairs] + [pair.rejected for pair in pairs]
    return PairBatch(collate(rows, pad_token_id), [pair.key for pair in pairs])


def pair_scores(values: torch.Tensor, batch: PairBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """(2P, L) values of a pair batch -> the (P,) chosen and (P,) rejected scores."""
    scores = last_token_scores(values, batch.batch.attention_mask.to(values.device))
    return scores[: batch.pairs], scores[batch.pairs :]


def bradley_terry_loss(
    chosen: torch.Tensor, rejected: torch.Tensor, margin: float = 0.0, centring_weight: float = 0.0
) -> torch.Tensor:
    """(P,) scores of each pair's chosen and rejected reply -> (P,) losses:
    -log sigmoid(r_c - r_r - margin) + centring_weight * (r_c + r_r)^2. The centring term keeps the scores
    near zero (the Bradley-Terry term fixes only their differences); sum and divide by the pairs counted."""
    return -F.logsigmoid(chosen - rejected - margin) + centring_weight * (chosen + rejected) ** 2


@dataclass
class RewardStats:
    """Raw scores' mean and std, which the service turns into a preference in [0, 1]."""

    mean: float
    std: float
    origin: str = "eval"  # "eval": the held-out pairs at the run's last evaluation; "train": its last step's batch
    step: int | None = None  # the training step they were measured at
    pairs: int = 0  # pairs they were measured over (each gives 2 scores)

    def preference(self, raw: float) -> float:
        """sigmoid((raw - mean) / std): 0.5 for a reply scored as the average one."""
        return 1.0 / (1.0 + math.exp(-(raw - self.mean) / max(self.std, 1e-6)))

    def save(self, directory: str | Path) -> Path:
        path = Path(directory) / REWARD_STATS
        fields = asdict(self)
        fields["from"] = fields.pop("origin")
        path.write_text(json.dumps(fields, indent=1) + "\n")
        return path

    @classmethod
    def load(cls, directory: str | Path) -> RewardStats:
        path = Path(directory) / REWARD_STATS
        if not path.exists():
            raise FileNotFoundError(f"{path} is missing: {directory} is not a reward model's export")
        fields = json.loads(path.read_text())
        fields["origin"] = fields.pop("from", "eval")
        return cls(**fields)


def load_reward_model(
    directory: str | Path, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"
) -> tuple[Step3VLForValue, RewardStats]:
    """A reward model's export (launch/export_hf.py on a train_rm.py run), in eval mode on `device`,
    without DeepSpeed, and its score statistics."""
    stats = RewardStats.load(directory)
    return Step3VLForValue.from_pretrained(directory, dtype=dtype).to(device).eval(), stats


@torch.no_grad()
def score_samples(
    model: Step3VLForValue, samples: list[ProcessedSample], pad_token_id: int, device: torch.device | str = "cpu"
) -> list[float]:
    """Raw scores of `samples` (each `processor(reward_conversation(...), images)`), in one forward."""
    batch = collate(samples, pad_token_id)  # on the right: see the module's docstring
    values = model(**batch.model_inputs(with_labels=False, device=device, pixel_dtype=model.dtype))
    return last_token_scores(values, batch.attention_mask.to(values.device)).tolist()
