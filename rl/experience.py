"""What flows through an RL iteration: prompts, the engine's completions, and responses with their
rewards, log-probs, values and advantages; and the padded batches the trainer ranks run on."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import torch

from step3vl_train.processing.processor import IGNORE_INDEX, Batch, ProcessedSample, collate


@dataclass
class Prompt:
    key: str  # the sample's key: `shard.tar:KEY`
    task: str  # the name of the prompt source it came from, for per-task metrics
    sample: ProcessedSample  # the prompt's tokens (generation prompt included) and pixels
    messages: list[dict[str, Any]]  # as in the sample, for engines that apply the chat template themselves
    images: list[bytes]  # encoded, as stored
    reward: str
    answer: Any = None
    boxes: list[list[float]] = field(default_factory=list)
    points: list[list[float]] = field(default_factory=list)
    image_size: tuple[int, int] | None = None
    question: str = ""  # the prompt's text, for model-based verifiers
    reference: str | None = None  # RLHF: a stronger model's response, the reward model's anchor
    # PaCoRe: the problem as stored (`messages` is then the synthesis conversation), its message pool, and
    # the messages this prompt was given.
    original_messages: list[dict[str, Any]] | None = None
    pool: list[dict[str, Any]] = field(default_factory=list)
    synthesis: SynthesisInfo | None = None


@dataclass
class SynthesisInfo:
    """The messages a PaCoRe prompt was given."""

    indices: list[int]  # into the prompt's pool, in the order of the references
    message_reward: float | None  # the mean reward of those that carry one
    dropped: dict[str, int] = field(default_factory=dict)  # drawn but not given, by reason (over_budget)


FINISHED = ("stop", "length")


@dataclass
class Completion:
    token_ids: list[int]
    logprobs: list[float]  # the engine's log-probability of each token, at the sampling temperature
    # "stop" (an end token, included in token_ids), "length", or "paused": cut short by a weight sync
    # (rollout.partial), to be continued from these tokens under the new weights
    finish_reason: str
    # The policy version that sampled each token, run-length coded: [(version, tokens), ...] in token order
    # (the producer stamps them; rl/producer.py). Versions never decrease along a response.
    versions: list[tuple[int, int]] = field(default_factory=list)

    @property
    def finished(self) -> bool:
        return self.finish_reason in FINISHED

    def token_versions(self) -> list[int]:
        return [version for version, count in self.versions for _ in range(count)]

    def stamped(self, version: int, previous: list[tuple[int, int]]) -> Completion:
        """This completion, whose tokens after the `previous` runs' were sampled by `version`."""
        new = len(self.token_ids) - sum(count for _, count in previous)
        self.versions = list(previous)
        if new and self.versions and self.versions[-1][0] == version:
            self.versions[-1] = (version, self.versions[-1][1] + new)
        elif new:
            self.versions.append((version, new))
        return self


@dataclass
class Response:
    """One response to one prompt, and what the iteration learns about it."""

    group: int  # the prompt's index in the iteration
    prompt: Prompt
    completion: Completion
    reward: float = 0.0
    status: str = "ok"  # rl.rewards.types.STATUSES
    valid: bool = True  # False where the scorer failed: left out of the update
    components: dict[str, float] = field(default_factory=dict)  # a combined reward's parts, by name
    old_logprobs: torch.Tensor | None = None  # (R,) the trainer's, before this iteration's update
    values: torch.Tensor | None = None  # (R,) the critic's V(s_t) for each response token
    advantages: torch.Tensor | None = None
    returns: torch.Tensor | None = None
    # Leading tokens sampled by an older policy than the one trained (algo.max_staleness >= 1; versions never
    # decrease along a response, so they are a prefix): PPO's ratio takes them against the recorded behaviour
    # log-probs. `stale` of them, more than algo.max_staleness versions old, are left out of the losses.
    behind: int = 0
    stale: int = 0

    @property
    def length(self) -> int:
        return len(self.completion.token_ids)

    @property
    def trained_tokens(self) -> int:
        return self.length - self.stale if self.valid else 0

    def trained_mask(self) -> torch.Tensor:
        """(R,) 1 on the tokens the losses take."""
        mask = torch.full((self.length,), float(self.valid))
        mask[: self.stale] = 0.0
        return mask

    def behind_mask(self) -> torch.Tensor:
        """(R,) 1 on the tokens an older policy sampled."""
        mask = torch.zeros(self.length)
        mask[: self.behind] = 1.0
        return mask


@dataclass
class SequenceBatch:
    """Prompt + response rows padded on the right. Per-token tensors are (B, L-1), aligned with the
    targets: column t is about token t+1, predicted from the logits at t."""

    batch: Batch
    response_mask: torch.Tensor  # (B, L-1) 1 where the target is a response token
    # Rows of several responses (shared_sequence_batch): (B, L-1) which response, in the order of `gather`,
    # each target belongs to, -1 where none. None: a response a row.
    response_index: torch.Tensor | None = None

    def scatter(self, rows: list[torch.Tensor]) -> torch.Tensor:
        """Per-response vectors (R_i,) into a (B, L-1) tensor at the response positions, 0 elsewhere."""
        out = torch.zeros(self.response_mask.shape, dtype=torch.float32)
        out[self.response_mask.bool()] = torch.cat([row.float() for row in rows]) if rows else out[:0, 0]
        return out

    def response_labels(self) -> torch.Tensor:
        """(B, L) the response tokens, IGNORE_INDEX elsewhere: the labels that make the model score exactly
        the response (its log-probs come back (B, L), column t about token t + 1, as here)."""
        labels = torch.full_like(self.batch.input_ids, IGNORE_INDEX)
        labels[:, 1:] = torch.where(self.response_mask.bool(), self.batch.input_ids[:, 1:], IGNORE_INDEX)
        return labels

    def gather(self, tensor: torch.Tensor) -> list[torch.Tensor]:
        """(B, L-1) back into per-response vectors."""
        index = self.response_index
        lengths = (self.response_mask.sum(1) if index is None else torch.bincount(index[index >= 0])).tolist()
        return list(tensor[self.response_mask.bool()].detach().float().split([int(n) for n in lengths]))


def sequence_batch(items: list[tuple[ProcessedSample, list[int]]], pad_token_id: int) -> SequenceBatch:
    """Rows of (prompt, response token ids)."""
    samples, starts = [], []
    for prompt, response in items:
        samples.append(row_sample(prompt, [prompt.input_ids, torch.tensor(response, dtype=torch.long)]))
        starts.append((len(prompt.input_ids), len(response)))
    batch = collate(samples, pad_token_id)
    mask = torch.zeros(batch.input_ids.shape[0], batch.input_ids.shape[1] - 1, dtype=torch.long)
    for row, (prompt_len, response_len) in enumerate(starts):
        mask[row, prompt_len - 1 : prompt_len - 1 + response_len] = 1
    return SequenceBatch(batch, mask)


def shared_sequence_batch(rows: list[tuple[ProcessedSample, list[list[int]]]], pad_token_id: int) -> SequenceBatch:
    """Rows of (prompt, the token ids of responses to it), each laid out as the prompt but its last token
    once, then each response after its own copy of that token: the copy continues the prompt's positions, so
    the row's position ids tell the packed kernels (model/attention.py) that the response sees the prompt and
    itself only, as it would in a row of its own, and its first token is predicted where it would be there.
    Rows are packed (position ids, no padding mask); the padding after a row is a sample of its own. A row of
    one response is `sequence_batch`'s row."""
    samples, positions, spans = [], [], []
    for prompt, responses in rows:
        prefix, last = prompt.input_ids[:-1], prompt.input_ids[-1:]
        parts, place, row_spans = [prefix], [torch.arange(len(prefix))], []
        for response in responses:
            row_spans.append((sum(len(part) for part in parts), len(response)))
            parts += [last, torch.tensor(response, dtype=torch.long)]
            place.append(torch.arange(len(prefix), len(prefix) + 1 + len(response)))
        samples.append(row_sample(prompt, parts))
        positions.append(torch.cat(place))
        spans.append(row_spans)
    batch = collate(samples, pad_token_id)
    position_ids = torch.zeros_like(batch.input_ids)
    for row, place in enumerate(positions):
        position_ids[row, : len(place)] = place
        position_ids[row, len(place) :] = torch.arange(position_ids.shape[1] - len(place))
    index = torch.full((batch.input_ids.shape[0], batch.input_ids.shape[1] - 1), -1, dtype=torch.long)
    placed = [(row, start, length) for row, row_spans in enumerate(spans) for start, length in row_spans]
    for response, (row, start, length) in enumerate(placed):
        index[row, start : start + length] = response
    return SequenceBatch(replace(batch, position_ids=position_ids), (index >= 0).long(), index)


def row_sample(prompt: ProcessedSample, parts: list[torch.Tensor]) -> ProcessedSample:
    """A forward row of these token ids, with the prompt's images."""
    ids = torch.cat(parts)
    return ProcessedSample(
        input_ids=ids,
        labels=ids.clone(),
        pixels=prompt.pixels,
        num_patches=prompt.num_patches,
        patch_newline_mask=prompt.patch_newline_mask,
    )
