"""What scores a batch of items inside a service replica: a scalar reward model, a generative judge, or a
user's class. A backend is plain Python, `score(items) -> verdicts`, one verdict per item in order; the
service runs it in a thread of its replica and batches the items of concurrent requests into one call."""

from __future__ import annotations

from typing import Protocol

import torch

from rl.rm_service.config import RMConfig, ScalarRMConfig
from rl.rm_service.items import ItemScore, ScoreItem
from step3vl_train.processing.images import ImageError, load_image
from step3vl_train.processing.placeholders import PlaceholderMismatchError
from step3vl_train.usage import import_callable


class Backend(Protocol):
    needs_reference: bool  # items must carry a reference response (400 otherwise)

    def score(self, items: list[ScoreItem]) -> list[ItemScore]: ...


class ScalarBackend:
    """Our model with a value head (launch/train_rm.py), read at the last token of prompt + final answer.
    The raw score is normalised with the mean and std the export carries and squashed into a preference:
    sigmoid((raw - mean) / std), so 0.5 is an average response of the RM's held-out data."""

    needs_reference = False

    def __init__(self, config: ScalarRMConfig):
        from step3vl_train.processing.model_processor import model_settings
        from step3vl_train.processing.processor import load_processor
        from step3vl_train.train.reward_model import load_reward_model

        self.config = config
        cuda = torch.cuda.is_available()
        self.device = torch.device("cuda" if cuda else "cpu")
        dtype = torch.bfloat16 if (cuda if config.bf16 is None else config.bf16) else torch.float32
        self.model, self.stats = load_reward_model(config.model, dtype, self.device)
        settings = model_settings(config.model, config.processor, self.model.config, "rm.scalar.processor")
        self.processor = load_processor(config.tokenizer or config.model, settings)
        pad = self.processor.tokenizer.pad_token_id
        self.pad_token_id = pad if pad is not None else 0

    def score(self, items: list[ScoreItem]) -> list[ItemScore]:
        from step3vl_train.train.reward_model import reward_conversation, score_samples

        verdicts: list[ItemScore | None] = [None] * len(items)
        samples, positions = [], []
        for index, item in enumerate(items):
            try:
                images = [load_image(data, f"item {item.id} image {i}") for i, data in enumerate(item.images)]
                sample = self.processor(reward_conversation(item.messages, item.response), images, sample=item.id)
            except (ImageError, PlaceholderMismatchError) as error:
                verdicts[index] = ItemScore(None, "error", detail=str(error))
                continue
            if len(sample.input_ids) > self.config.max_tokens:
                detail = f"{len(sample.input_ids)} tokens, over rm.scalar.max_tokens={self.config.max_tokens}"
                verdicts[index] = ItemScore(None, "error", detail=detail)
                continue
            samples.append(sample)
            positions.append(index)
        raw = score_samples(self.model, samples, self.pad_token_id, self.device) if samples else []
        for index, value in zip(positions, raw, strict=True):
            preference = self.stats.preference(value)
            verdicts[index] = ItemScore(preference, components={"rm": preference, "rm/raw": value})
        return verdicts  # type: ignore[return-value]


class GenRMBackend:
    """A generative judge comparing each response with the item's reference, in both orders (rl/rewards/genrm.py)."""

    needs_reference = True

    def __init__(self, config: RMConfig):
        from rl.chat_models import build_chat_model
        from rl.rewards.genrm import GenRM

        self.genrm = GenRM(config.genrm, build_chat_model(config.judge, "rm.judge"))

    def score(self, items: list[ScoreItem]) -> list[ItemScore]:
        from rl.rewards.genrm import JudgeItem

        judged = self.genrm.judge(
            [JudgeItem(item.messages, item.images, item.response, item.reference or "") for item in items]
        )
        return [ItemScore(j.preference, j.status, j.components, j.detail) for j in judged]


def build_backend(config: RMConfig) -> Backend:
    if config.backend == "scalar":
        return ScalarBackend(config.scalar)
    if config.backend == "genrm":
        return GenRMBackend(config)
    return import_callable(config.backend, "rm.backend")(**config.options)
