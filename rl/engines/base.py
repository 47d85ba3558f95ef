"""The interface every rollout engine has."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from rl.experience import Completion, Prompt


@dataclass
class SamplingParams:
    n: int = 1  # responses per prompt
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0: off
    max_new_tokens: int = 256
    stop_token_ids: list[int] = field(default_factory=list)
    # Never sampled: the image placeholder tokens. A response holding `<im_patch>` would claim image
    # features that do not exist when the trainer scores it.
    suppressed_token_ids: list[int] = field(default_factory=list)


def whole_groups(groups: list[int] | None, finished: list[bool]) -> int:
    """rollout.partial: how many of the rows' `groups` have every row finished (a row past the end of
    `finished` has not)."""
    open_ = {g for i, g in enumerate(groups or []) if i >= len(finished) or not finished[i]}
    return len(set(groups or []) - open_)


class RolloutEngine(Protocol):
    """Weights arrive either as buckets of full tensors through Ray (`load_weights`, the transformers
    engine) or through vLLM's weight-transfer API (NCCL or CUDA IPC; see rl/sync.py)."""

    def generate(self, prompts: list[Prompt], sampling: SamplingParams, seed: int) -> list[list[Completion]]:
        """`sampling.n` completions for each prompt, in order; the same seed gives the same completions."""

    def generate_rows(
        self,
        rows: list[tuple[Prompt, Completion | None]],
        sampling: SamplingParams,
        seed: int,
        groups: list[int] | None = None,
        enough: int = 0,
    ) -> list[Completion]:
        """rollout.partial: one completion a row, new (None) or a paused one continued under the engine's
        current weights (its tokens and log-probs, then the new ones), to a stop token or to
        `sampling.max_new_tokens` in all. With `groups` (a group id a row), it returns as soon as `enough`
        groups have every row finished, the others "paused"."""

    def pause_generation(self) -> None:
        """From another thread: the generation in progress ends at its next step, its unfinished
        completions "paused" (as do calls that start before `resume_generation`)."""

    def resume_generation(self) -> None:
        """Generation runs to its end again."""

    def finish_weight_update(self) -> int:
        """After the last bucket: checks every weight was replaced, drops caches that hold old weights'
        results; returns the number of tensors updated."""

    def sleep(self) -> None:
        """Frees the accelerator memory the engine holds while the trainer uses it (colocated)."""

    def wake_up(self, tags: list[str] | None = None) -> None:
        """Takes back what `sleep` freed: `["weights"]` first (the weight sync writes into them), then
        `["kv_cache"]`, so the sync's buffers and the KV cache are never on the GPU together; None: both."""
