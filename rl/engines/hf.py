"""The transformers engine: batched `generate` with a KV cache, on the CPU or a GPU.

It holds an ordinary (unpartitioned) copy of the policy. Log-probs come from the raw logits of each step
at the sampling temperature, which is what the trainer computes, so the two agree to rounding in fp32
(the suppressed image tokens shape what is sampled, not the reported log-probs; top-p and top-k are for
evaluation only, since they would make the sampled distribution differ from the scored one). They
are taken step by step, so memory holds one step's distribution, never the (batch, length, vocabulary)
logits: with Qwen3's 152K vocabulary those would be hundreds of GB at RL lengths.
"""

from __future__ import annotations

import threading
from dataclasses import replace

import torch
from transformers import LogitsProcessor, LogitsProcessorList, StoppingCriteria, SuppressTokensLogitsProcessor

from rl.engines.base import SamplingParams, whole_groups
from rl.experience import Completion, Prompt
from rl.feature_cache import encode_samples
from step3vl_train.model import Step3VLConfig, Step3VLForConditionalGeneration
from step3vl_train.model.view_features import ViewFeatures
from step3vl_train.processing.processor import collate


class StepLogprobs(LogitsProcessor):
    """Records the log-prob of each sampled token. Placed first, it sees the raw logits; a step's token is
    known only at the next call (the last column of `input_ids`), so it keeps one step's distribution.
    The log-probs go into a buffer allocated up front: a small tensor kept per step would sit between the
    large per-step ones in the heap and fragment it (RSS grew by GBs over 1,000 steps)."""

    def __init__(self, temperature: float, batch_size: int, max_new_tokens: int, device: torch.device):
        self.temperature = temperature
        self.previous: torch.Tensor | None = None
        self.buffer = torch.zeros(batch_size, max_new_tokens, device=device)
        self.step = 0

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self.previous is not None:
            self.record(input_ids[:, -1])
        self.previous = torch.log_softmax(scores.float() / self.temperature, dim=-1)
        return scores

    def record(self, tokens: torch.Tensor) -> None:
        self.buffer[:, self.step] = self.previous.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
        self.step += 1

    def logprobs(self, new_tokens: torch.Tensor) -> torch.Tensor:
        """(B, T) log-probs of `new_tokens`, the generated columns, once generation has ended."""
        self.record(new_tokens[:, -1])
        return self.buffer[:, : self.step].cpu()


def paused(prefix: Completion | None) -> Completion:
    """A row given back as it came: its tokens so far, none new."""
    return (
        Completion(list(prefix.token_ids), list(prefix.logprobs), "paused") if prefix else Completion([], [], "paused")
    )


class RowBudgets(StoppingCriteria):
    """Ends each row at its own budget of new tokens (a continued row has spent part of it already); every
    row once `paused` is set (a weight sync is due), or once `enough` of the rows' groups are whole
    (rollout.partial: the batch has what it needs, the rest is continued later)."""

    def __init__(self, budgets: list[int], paused: threading.Event, start: int, stop_token_ids: list[int],
                 groups: list[int] | None, enough: int, device: torch.device):  # fmt: skip
        self.budgets = torch.tensor(budgets, device=device)
        self.paused = paused
        self.start = start  # input columns
        self.stop_token_ids = torch.tensor(stop_token_ids, dtype=torch.long, device=device)
        self.finished = torch.zeros(len(budgets), dtype=torch.bool, device=device)
        self.groups = torch.unique(torch.tensor(groups or [0] * len(budgets)), return_inverse=True)[1].to(device)
        self.enough = enough

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs) -> torch.BoolTensor:
        self.finished |= torch.isin(input_ids[:, -1], self.stop_token_ids)
        self.finished |= self.budgets <= input_ids.shape[1] - self.start
        open_rows = torch.zeros(int(self.groups.max()) + 1, device=input_ids.device)
        open_rows.index_add_(0, self.groups, (~self.finished).float())
        if self.paused.is_set() or (self.enough and int((open_rows == 0).sum()) >= self.enough):
            return torch.ones_like(self.finished)
        return self.finished.clone()


class HFEngine:
    def __init__(
        self,
        model_config: dict,
        init_from: str | None,
        pad_token_id: int,
        batch_size: int = 64,
        dtype: torch.dtype = torch.float32,
        device: str | None = None,
    ):
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if init_from:
            self.model = Step3VLForConditionalGeneration.from_pretrained(init_from, dtype=dtype)
        else:
            self.model = Step3VLForConditionalGeneration(Step3VLConfig.from_dict(model_config)).to(dtype)
        self.model.to(self.device).eval().requires_grad_(False)
        self.params = dict(self.model.named_parameters())
        self.pad_token_id = pad_token_id
        self.batch_size = batch_size
        self.updated: set[str] = set()
        self.complete = False  # every tensor has been replaced once (the first sync sends them all)
        self.paused = threading.Event()  # set from another thread of the actor (rollout.partial)

    def generate(self, prompts: list[Prompt], sampling: SamplingParams, seed: int) -> list[list[Completion]]:
        rows = [(prompt, None) for prompt in prompts for _ in range(sampling.n)]
        completions = self.generate_rows(rows, sampling, seed)
        return [completions[i : i + sampling.n] for i in range(0, len(completions), sampling.n)]

    def pause_generation(self) -> None:
        self.paused.set()

    def resume_generation(self) -> None:
        self.paused.clear()

    @torch.no_grad()
    def generate_rows(
        self,
        rows: list[tuple[Prompt, Completion | None]],
        sampling: SamplingParams,
        seed: int,
        groups: list[int] | None = None,
        enough: int = 0,
    ) -> list[Completion]:
        """In calls of `batch_size` rows. With `enough`, each call returns once the groups made whole so far
        reach it, and the calls after that give their rows back paused, untouched."""
        completions: list[Completion] = []
        for chunk, start in enumerate(range(0, len(rows), self.batch_size)):
            torch.manual_seed(seed * 1_000_003 + chunk)
            part = rows[start : start + self.batch_size]
            left = enough - whole_groups(groups, [c.finished for c in completions]) if enough else 0
            if enough and left <= 0:
                completions += [paused(prefix) for _, prefix in part]
                continue
            completions += self._generate(part, sampling, (groups or [])[start : start + self.batch_size] or None, left)
        return completions

    def _generate(
        self, rows: list[tuple[Prompt, Completion | None]], sampling: SamplingParams, groups=None, enough: int = 0
    ) -> list[Completion]:
        """Each row's completion: a new one, or the row's paused one continued under these weights."""
        prompts = [prompt for prompt, _ in rows]
        prefixes = [list(prefix.token_ids) if prefix else [] for _, prefix in rows]
        if self.paused.is_set():  # paused before it began: nothing new
            return [paused(prefix) for _, prefix in rows]
        # The images go in as features, each prompt's views encoded once for its `n` rows, not as pixels.
        samples = []
        for prompt, ids in zip(prompts, prefixes, strict=True):
            input_ids = torch.cat([prompt.sample.input_ids, torch.tensor(ids, dtype=torch.long)])
            samples.append(replace(prompt.sample, pixels=None, input_ids=input_ids, labels=input_ids))
        batch = collate(samples, self.pad_token_id, padding_side="left")
        inputs = batch.model_inputs(False, device=self.device)
        inputs["image_features"] = self._image_features(prompts)
        budgets = [sampling.max_new_tokens - len(ids) for ids in prefixes]
        recorder = StepLogprobs(sampling.temperature, len(rows), max(budgets), self.device)
        processors = [recorder]  # before generate's own warpers (temperature, top-k, top-p)
        if sampling.suppressed_token_ids:
            processors.append(SuppressTokensLogitsProcessor(sampling.suppressed_token_ids, device=self.device))
        start = inputs["input_ids"].shape[1]
        output = self.model.generate(
            **inputs,
            do_sample=True,
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            top_k=sampling.top_k,
            max_new_tokens=max(budgets),
            eos_token_id=sampling.stop_token_ids,
            logits_processor=LogitsProcessorList(processors),
            stopping_criteria=[
                RowBudgets(budgets, self.paused, start, sampling.stop_token_ids, groups, enough, self.device)
            ],
            pad_token_id=self.pad_token_id,
        )
        new_tokens = output[:, start:]
        logprobs = recorder.logprobs(new_tokens)
        new_tokens = new_tokens.cpu()
        stops = torch.isin(new_tokens, torch.tensor(sampling.stop_token_ids, dtype=torch.long))
        completions = []
        for row, (prefix, budget) in enumerate(zip(rows, budgets, strict=True)):
            hits = stops[row, :budget].nonzero()
            if len(hits):
                end, reason = int(hits[0]) + 1, "stop"
            else:
                end = min(budget, new_tokens.shape[1])
                reason = "length" if end == budget else "paused"
            old_ids, old_logprobs = (prefix[1].token_ids, prefix[1].logprobs) if prefix[1] else ([], [])
            completions.append(
                Completion(
                    [*old_ids, *new_tokens[row, :end].tolist()], [*old_logprobs, *logprobs[row, :end].tolist()], reason
                )
            )
        return completions

    def _image_features(self, rows: list[Prompt]) -> ViewFeatures | None:
        """The tower's features of the rows' images in row order, as `collate` lays out their pixels: the
        rows repeat each prompt `n` times, and each prompt's views go through the tower once."""
        rows = [row for row in rows if row.sample.pixels is not None]
        prompts = list({id(row): row for row in rows}.values())
        if not prompts:
            return None
        parts = encode_samples(self.model, [prompt.sample for prompt in prompts], self.device, self.model.dtype)
        by_prompt = {id(prompt): part for prompt, part in zip(prompts, parts, strict=True)}
        return ViewFeatures.cat([by_prompt[id(row)] for row in rows])

    def load_weights(self, tensors: dict[str, torch.Tensor]) -> None:
        unknown = sorted(set(tensors) - set(self.params))
        if unknown:
            raise KeyError(f"weights the engine's model does not have: {unknown[:5]}")
        for name, tensor in tensors.items():
            self.params[name].data.copy_(tensor)
        self.updated.update(tensors)

    def finish_weight_update(self) -> int:
        """Later syncs may send a subset (the trainable tensors); the first must send every tensor, since
        the engine was built without weights of its own."""
        missing = sorted(set(self.params) - self.updated)
        count, self.updated = len(self.updated), set()
        if missing and not self.complete:
            raise RuntimeError(f"the first weight sync left {len(missing)} tensors unset, e.g. {missing[:5]}")
        self.complete = True
        return count

    def sleep(self) -> None:
        if self.device.type == "cuda":
            self.model.to("cpu")
            torch.cuda.empty_cache()

    def wake_up(self, tags: list[str] | None = None) -> None:
        if tags is None or "weights" in tags:  # its cache lives only within a generate call
            self.model.to(self.device)
