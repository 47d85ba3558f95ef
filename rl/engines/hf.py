"""The transformers engine: batched `generate` with a KV cache, on the CPU or a GPU.

It holds an ordinary (unpartitioned) copy of the policy. Log-probs come from the raw logits of each step
at the sampling temperature, which is what the trainer computes, so the two agree to rounding in fp32
(the suppressed image tokens shape what is sampled, not the reported log-probs; top-p and top-k are for
evaluation only, since they would make the sampled distribution differ from the scored one). They
are taken step by step, so memory holds one step's distribution, never the (batch, length, vocabulary)
logits: with Qwen3's 152K vocabulary those would be hundreds of GB at RL lengths.
"""

from __future__ import annotations

from dataclasses import replace

import torch
from transformers import LogitsProcessor, LogitsProcessorList, SuppressTokensLogitsProcessor

from rl.engines.base import SamplingParams
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

    @torch.no_grad()
    def generate(self, prompts: list[Prompt], sampling: SamplingParams, seed: int) -> list[list[Completion]]:
        rows = [prompt for prompt in prompts for _ in range(sampling.n)]
        completions: list[Completion] = []
        for chunk, start in enumerate(range(0, len(rows), self.batch_size)):
            torch.manual_seed(seed * 1_000_003 + chunk)
            completions += self._generate(rows[start : start + self.batch_size], sampling)
        return [completions[i : i + sampling.n] for i in range(0, len(completions), sampling.n)]

    def _generate(self, prompts: list[Prompt], sampling: SamplingParams) -> list[Completion]:
        # The images go in as features, each prompt's views encoded once for its `n` rows, not as pixels.
        batch = collate([replace(p.sample, pixels=None) for p in prompts], self.pad_token_id, padding_side="left")
        inputs = batch.model_inputs(False, device=self.device)
        inputs["image_features"] = self._image_features(prompts)
        recorder = StepLogprobs(sampling.temperature, len(prompts), sampling.max_new_tokens, self.device)
        processors = [recorder]  # before generate's own warpers (temperature, top-k, top-p)
        if sampling.suppressed_token_ids:
            processors.append(SuppressTokensLogitsProcessor(sampling.suppressed_token_ids, device=self.device))
        output = self.model.generate(
            **inputs,
            do_sample=True,
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            top_k=sampling.top_k,
            max_new_tokens=sampling.max_new_tokens,
            eos_token_id=sampling.stop_token_ids,
            logits_processor=LogitsProcessorList(processors),
            pad_token_id=self.pad_token_id,
        )
        new_tokens = output[:, inputs["input_ids"].shape[1] :]
        logprobs = recorder.logprobs(new_tokens)
        new_tokens = new_tokens.cpu()
        stops = torch.isin(new_tokens, torch.tensor(sampling.stop_token_ids, dtype=torch.long))
        completions = []
        for row in range(len(prompts)):
            hits = stops[row].nonzero()
            end = int(hits[0]) + 1 if len(hits) else new_tokens.shape[1]
            completions.append(
                Completion(
                    new_tokens[row, :end].tolist(), logprobs[row, :end].tolist(), "stop" if len(hits) else "length"
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
