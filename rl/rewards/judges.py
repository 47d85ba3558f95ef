"""Judges: a chat model that answers a request (a user message with images) with text, behind one small
interface, so the GenRM (`genrm.py`) neither knows nor cares where the judge runs.

- `openai`: any OpenAI-compatible endpoint (vLLM, SGLang, a hosted API), through the verifier's client
  settings (`VerifierConfig`: its URL, model, key variable, timeout, retries and concurrency). Images go as
  base64 data URLs. Each wait is bounded by `timeout_s` per attempt, `max_retries + 1` attempts.
- `hf` / `vllm`: the judge model run in this process by one of our rollout engines (`rl/engines`), from a
  released-format directory, the prompt built by our processor as a rollout's is.

A judge never raises for one bad request: a timeout or a failed call is that request's reply status.
"""

from __future__ import annotations

import base64
import io
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Protocol

from PIL import Image, UnidentifiedImageError

from rl.engines import build_rollout_engine
from rl.experience import Prompt
from rl.rewards.verifier import VerifierConfig, openai_client
from step3vl_train.processing.images import load_image
from step3vl_train.processing.processor import load_processor


@dataclass
class JudgeRequest:
    messages: list[dict[str, Any]]  # chat messages, images as {"type": "image"} parts
    images: list[bytes]  # encoded, in the order of the image parts


@dataclass
class JudgeReply:
    text: str | None  # the judge's reply; None when the call failed
    status: str = "ok"  # "ok", or "timeout" / "error" when there is no text
    detail: str = ""


class Judge(Protocol):
    def complete(self, requests: list[JudgeRequest]) -> list[JudgeReply]:
        """One reply per request, in order."""


@dataclass
class JudgeConfig:
    backend: str = "openai"  # openai | hf | vllm
    # openai: the endpoint. Its verdict-specific fields (max_tokens, max_*_chars) are not read here:
    # max_new_tokens below bounds the reply on every backend.
    endpoint: VerifierConfig = field(default_factory=VerifierConfig)
    # hf / vllm: a released-format model directory (an export of ours, or StepFun's release).
    model: str | None = None
    tokenizer: str = "tiny"  # "tiny" or a tokenizer directory
    processor: dict[str, Any] = field(default_factory=dict)  # configs/processor/*.yaml; empty: the released one
    # hf without `model`: a randomly initialised judge of this architecture (configs/model/*.yaml), for tests.
    model_config: dict[str, Any] = field(default_factory=dict)
    max_new_tokens: int = 2048  # of the reply, reasoning included
    temperature: float = 0.0  # 0: greedy
    batch_size: int = 16  # hf: requests generated together
    gpu_memory_utilization: float = 0.6  # vllm
    tensor_parallel_size: int = 1  # vllm


def build_judge(config: JudgeConfig) -> Judge:
    if config.backend == "openai":
        return OpenAIJudge(config)
    if config.backend in ("hf", "vllm"):
        return EngineJudge(config)
    raise ValueError(f"judge.backend must be 'openai', 'hf' or 'vllm', not {config.backend!r}")


def data_url(image: bytes) -> str:
    """`image` as a base64 data URL, its MIME type read from the bytes. Raises ValueError when PIL cannot
    identify them."""
    try:
        with Image.open(io.BytesIO(image)) as opened:
            mime = Image.MIME[opened.format]
    except (UnidentifiedImageError, OSError, KeyError) as error:
        raise ValueError(f"an image of unknown format ({error})") from error
    return f"data:{mime};base64,{base64.b64encode(image).decode('ascii')}"


def openai_messages(request: JudgeRequest) -> list[dict[str, Any]]:
    """The request's messages with each `{"type": "image"}` part replaced by its image as a data URL."""
    images = iter(request.images)
    messages = []
    for message in request.messages:
        content = message["content"]
        if not isinstance(content, str):
            content = [
                {"type": "image_url", "image_url": {"url": data_url(next(images))}} if part["type"] == "image" else part
                for part in content
            ]
        messages.append({**message, "content": content})
    return messages


class OpenAIJudge:
    def __init__(self, config: JudgeConfig):
        if not config.endpoint.base_url:
            raise ValueError("judge.endpoint.base_url is not set, but judge.backend=openai")
        self.config = config
        self.client = openai_client(config.endpoint)
        self.threads = ThreadPoolExecutor(config.endpoint.max_concurrency, thread_name_prefix="judge")

    def complete(self, requests: list[JudgeRequest]) -> list[JudgeReply]:
        futures = [self.threads.submit(self.complete_one, request) for request in requests]
        return [future.result() for future in futures]  # each bounded by the client's timeout and retries

    def complete_one(self, request: JudgeRequest) -> JudgeReply:
        from openai import APIError, APITimeoutError

        try:
            messages = openai_messages(request)
        except ValueError as error:
            return JudgeReply(None, "error", f"judge: {error}")
        try:
            completion = self.client.chat.completions.create(
                model=self.config.endpoint.model,
                messages=messages,
                temperature=self.config.temperature,
                max_tokens=self.config.max_new_tokens,
            )
        except APITimeoutError as error:
            return JudgeReply(None, "timeout", f"judge: {error}")
        except APIError as error:
            return JudgeReply(None, "error", f"judge: {error}")
        # Only `content` is the reply: a reasoning model's `reasoning_content` is never parsed for scores.
        return JudgeReply(completion.choices[0].message.content if completion.choices else None)

    def close(self) -> None:
        self.threads.shutdown(wait=False, cancel_futures=True)
        self.client.close()


class EngineJudge:
    """The judge on a rollout engine: `hf` (transformers, the CPU or a GPU) or `vllm` (GPUs). A reply cut
    at `max_new_tokens` is returned as it is; the GenRM's parser decides whether it holds scores."""

    def __init__(self, config: JudgeConfig):
        from rl.iteration import chat_sampling  # here: rl.iteration imports rl.rewards

        if config.backend == "vllm" and not config.model:
            raise ValueError("judge.backend=vllm loads judge.model: set it to a released-format directory")
        if config.backend == "hf" and not (config.model or config.model_config):
            raise ValueError("judge.backend=hf needs judge.model (or judge.model_config for a random judge)")
        self.processor = load_processor(config.tokenizer, config.processor or None)
        tokenizer = self.processor.tokenizer
        pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        # Greedy as the top-1 sample at temperature 1: the transformers engine always samples, dividing by
        # the temperature.
        temperature, top_k = (1.0, 1) if config.temperature == 0 else (config.temperature, 0)
        self.sampling = chat_sampling(self.processor, 1, temperature, config.max_new_tokens, top_k=top_k)
        self.stop_token_ids = self.sampling.stop_token_ids
        if config.backend == "hf":
            options = {
                "model_config": config.model_config,
                "init_from": config.model,
                "pad_token_id": pad_token_id,
                "batch_size": config.batch_size,
            }
        else:
            options = {
                "model": config.model,
                "tokenizer": config.tokenizer,
                "pad_token_id": pad_token_id,
                "processor_config": config.processor or None,
                "tensor_parallel_size": config.tensor_parallel_size,
                "gpu_memory_utilization": config.gpu_memory_utilization,
            }
        self.engine = build_rollout_engine(config.backend, **options)

    def complete(self, requests: list[JudgeRequest]) -> list[JudgeReply]:
        replies: list[JudgeReply | None] = [None] * len(requests)
        prompts, rows = [], []
        for row, request in enumerate(requests):
            try:
                prompts.append(self.prompt(request, f"judge-request-{row}"))
                rows.append(row)
            except ValueError as error:  # ImageError, PlaceholderMismatchError: this request's own fault
                replies[row] = JudgeReply(None, "error", f"judge: {error}")
        if prompts:
            decode = self.processor.tokenizer.decode
            for row, [completion] in zip(rows, self.engine.generate(prompts, self.sampling, seed=0), strict=True):
                tokens = [token for token in completion.token_ids if token not in self.stop_token_ids]
                replies[row] = JudgeReply(decode(tokens))
        return replies

    def prompt(self, request: JudgeRequest, key: str) -> Prompt:
        images = [load_image(data, key) for data in request.images]
        sample = self.processor(request.messages, images, add_generation_prompt=True, sample=key)
        return Prompt(key, "genrm", sample, request.messages, request.images, reward="genrm")
