"""A chat model that answers requests (chat messages with images) with text, behind one small interface, so
that its users (the GenRM's judge, `rl/rewards/genrm.py`; PaCoRe inference, `rl/pacore/inference.py`;
benchmark evaluation, `rl/evaluation/`) neither know nor care where it runs.

- `openai`: any OpenAI-compatible endpoint (vLLM, SGLang, a hosted API), through the verifier's client
  settings (`VerifierConfig`: its URL, model, key variable, timeout, retries and concurrency). Images go as
  base64 data URLs. Each of the n replies to a request is a call of its own, as the official PaCoRe code
  makes them; each wait is bounded by `timeout_s` per attempt, `max_retries + 1` attempts. Calls are not
  seeded: one seed for the n calls of a request would give n equal replies on a vLLM server.
- `hf` / `vllm`: the model run in this process by one of our rollout engines (`rl/engines`), from a
  released-format directory, the prompt built by our processor as a rollout's is.

A chat model never raises for one bad request: a timeout or a failed call is that reply's status.
"""

from __future__ import annotations

import base64
import copy
import io
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

from PIL import Image, UnidentifiedImageError

from rl.engines import build_rollout_engine
from rl.experience import Prompt
from rl.rewards.verifier import VerifierConfig, openai_client
from step3vl_train.model.config import Step3VLConfig
from step3vl_train.processing.images import load_image
from step3vl_train.processing.model_processor import model_settings
from step3vl_train.processing.processor import load_processor
from step3vl_train.processing.tokenizer import load_tokenizer
from step3vl_train.usage import UsageError

BACKENDS = ("openai", "hf", "vllm")


@dataclass
class ChatRequest:
    messages: list[dict[str, Any]]  # chat messages, images as {"type": "image"} parts
    images: list[bytes]  # encoded, in the order of the image parts


@dataclass
class ChatReply:
    text: str | None  # the reply (openai: the message's content); None when the call failed
    # openai: the message's `reasoning_content`, where the server splits it off (a reasoning parser); the
    # engines' `text` holds the reasoning itself, before its `</think>`.
    reasoning: str | None = None
    finish_reason: str = "stop"  # "length" when cut at max_new_tokens
    status: str = "ok"  # "ok", or "timeout" / "error" when there is no text
    detail: str = ""


class ChatModel(Protocol):
    def complete(self, requests: list[ChatRequest], n: int = 1, seed: int = 0) -> list[list[ChatReply]]:
        """`n` replies to each request, in order. `seed` seeds the `hf` engine's sampling."""

    def limited(self, max_new_tokens: int) -> ChatModel:
        """This model (the same engine or client) with replies of at most `max_new_tokens`: one loaded model
        serves lengths that differ by use (evaluation's SeRe and PaCoRe). Close the model it came from."""

    def close(self) -> None: ...


@dataclass
class ChatModelConfig:
    backend: str = "openai"  # openai | hf | vllm
    # openai: the endpoint. Its verdict-specific fields (max_tokens, max_*_chars) are not read here:
    # max_new_tokens below bounds the reply on every backend.
    endpoint: VerifierConfig = field(default_factory=VerifierConfig)
    # hf / vllm: a released-format model directory (an export of ours, or StepFun's release).
    model: str | None = None
    tokenizer: str | None = None  # "tiny" or a tokenizer directory; None: the model directory's own
    # A processor YAML (configs/processor/*.yaml) or its mapping, over the model directory's own; empty: the
    # model's own (an export's: what it trained with; StepFun's release: the released processor).
    processor: Any = None
    # hf without `model`: a randomly initialised model of this architecture (configs/model/*.yaml), for tests.
    model_config: dict[str, Any] = field(default_factory=dict)
    max_new_tokens: int = 2048  # of the reply, reasoning included
    temperature: float = 1.0  # 0: greedy
    top_p: float = 1.0
    batch_size: int = 16  # hf: sequences generated together
    gpu_memory_utilization: float = 0.6  # vllm
    tensor_parallel_size: int = 1  # vllm
    max_model_len: int | None = None  # vllm: prompt + reply; None: the model's (PaCoRe's synthesis wants 131072)

    @property
    def tokenizer_source(self) -> str | None:
        """Where the tokenizer comes from: `tokenizer`, else the model directory (exports carry theirs)."""
        return self.tokenizer or self.model

    def processor_settings(self, key: str) -> dict[str, Any]:
        """The processor's settings: the model directory's own (an export carries those it trained with), with
        the fields `processor` sets over them; UsageError where the model's vision tower takes other views.
        On vLLM the crop rule is vLLM's: vLLM 0.33 crops as configs/rollout/vllm.yaml explains, and our
        prompt must expand as its does."""
        settings = model_settings(self.model, self.processor, self.architecture(key), f"{key}.processor")
        return {**settings, "crop_rule": "vllm"} if self.backend == "vllm" else settings

    def architecture(self, key: str) -> Step3VLConfig:
        """The model's config: its directory's `config.json`, else `model_config`."""
        if not self.model:
            return Step3VLConfig.from_dict(self.model_config)
        path = Path(self.model) / "config.json"
        if not path.is_file():
            raise UsageError(f"{key}.model={self.model}: no config.json there; give a released-format directory")
        return Step3VLConfig.from_json_file(path)


def pacore_tokenizer(config: ChatModelConfig, key: str = "chat"):
    """The model's tokenizer, with which PaCoRe counts the tokens of messages: `tokenizer`, else the model
    directory's own."""
    if not config.tokenizer_source:
        raise UsageError(
            f"{key}.tokenizer is not set (nor model=DIR, whose tokenizer it would be): PaCoRe counts the tokens "
            "of messages with the model's tokenizer; give its directory, or tiny"
        )
    return load_tokenizer(config.tokenizer_source)


def build_chat_model(config: ChatModelConfig, key: str = "chat") -> ChatModel:
    """The configured model; `key` names its config section in messages about mistakes (UsageError)."""
    if config.backend not in BACKENDS:
        raise UsageError(f"{key}.backend must be one of {BACKENDS}, not {config.backend!r}")
    if config.backend == "openai":
        return OpenAIChatModel(config, key)
    return EngineChatModel(config, key)


def data_url(image: bytes) -> str:
    """`image` as a base64 data URL, its MIME type read from the bytes. Raises ValueError when PIL cannot
    identify them."""
    try:
        with Image.open(io.BytesIO(image)) as opened:
            mime = Image.MIME[opened.format]
    except (UnidentifiedImageError, OSError, KeyError) as error:
        raise ValueError(f"an image of unknown format ({error})") from error
    return f"data:{mime};base64,{base64.b64encode(image).decode('ascii')}"


def openai_messages(request: ChatRequest) -> list[dict[str, Any]]:
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


class OpenAIChatModel:
    def __init__(self, config: ChatModelConfig, key: str):
        if not config.endpoint.base_url:
            raise UsageError(f"{key}.endpoint.base_url is not set, but {key}.backend=openai")
        self.config = config
        self.client = openai_client(config.endpoint)
        self.threads = ThreadPoolExecutor(config.endpoint.max_concurrency, thread_name_prefix="chat")

    def complete(self, requests: list[ChatRequest], n: int = 1, seed: int = 0) -> list[list[ChatReply]]:
        """`seed` is not used: see the module's docstring."""
        futures = [[self.threads.submit(self.complete_one, request) for _ in range(n)] for request in requests]
        return [[future.result() for future in group] for group in futures]  # each bounded by timeout and retries

    def limited(self, max_new_tokens: int) -> OpenAIChatModel:
        view = copy.copy(self)
        view.config = replace(self.config, max_new_tokens=max_new_tokens)
        return view

    def complete_one(self, request: ChatRequest) -> ChatReply:
        from openai import APIError, APITimeoutError

        try:
            messages = openai_messages(request)
        except ValueError as error:
            return ChatReply(None, status="error", detail=f"chat: {error}")
        try:
            completion = self.client.chat.completions.create(
                model=self.config.endpoint.model,
                messages=messages,
                temperature=self.config.temperature,
                top_p=self.config.top_p,
                max_tokens=self.config.max_new_tokens,
            )
        except APITimeoutError as error:
            return ChatReply(None, status="timeout", detail=f"chat: {error}")
        except APIError as error:
            return ChatReply(None, status="error", detail=f"chat: {error}")
        if not completion.choices:
            return ChatReply(None, status="error", detail="chat: a completion with no choices")
        choice = completion.choices[0]
        return ChatReply(
            choice.message.content,
            getattr(choice.message, "reasoning_content", None),  # an extra field: absent from plain servers
            choice.finish_reason or "stop",
        )

    def close(self) -> None:
        self.threads.shutdown(wait=False, cancel_futures=True)
        self.client.close()


class EngineChatModel:
    """The model on a rollout engine: `hf` (transformers, the CPU or a GPU) or `vllm` (GPUs). A reply's text
    is the decoded response without its stop token, cut at `max_new_tokens` as it is (finish_reason
    "length"); its reasoning stays in it, before `</think>`."""

    def __init__(self, config: ChatModelConfig, key: str):
        from rl.iteration import chat_sampling  # here: rl.iteration imports rl.rewards

        if config.backend == "vllm" and not config.model:
            raise UsageError(f"{key}.backend=vllm loads {key}.model: set it to a released-format directory")
        if config.backend == "hf" and not (config.model or config.model_config):
            raise UsageError(f"{key}.backend=hf needs {key}.model (or {key}.model_config for a random model)")
        if not config.tokenizer_source:
            raise UsageError(f"{key}.tokenizer is not set: give tiny or a tokenizer directory")
        settings = config.processor_settings(key)
        self.processor = load_processor(config.tokenizer_source, settings)
        tokenizer = self.processor.tokenizer
        pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        # Greedy as the top-1 sample at temperature 1: the transformers engine always samples, dividing by
        # the temperature.
        temperature, top_k = (1.0, 1) if config.temperature == 0 else (config.temperature, 0)
        self.sampling = chat_sampling(self.processor, 1, temperature, config.max_new_tokens, config.top_p, top_k)
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
                "tokenizer": config.tokenizer_source,
                "pad_token_id": pad_token_id,
                "processor_config": settings,
                "tensor_parallel_size": config.tensor_parallel_size,
                "gpu_memory_utilization": config.gpu_memory_utilization,
                "max_model_len": config.max_model_len,
            }
        self.engine = build_rollout_engine(config.backend, **options)

    def complete(self, requests: list[ChatRequest], n: int = 1, seed: int = 0) -> list[list[ChatReply]]:
        replies: list[list[ChatReply] | None] = [None] * len(requests)
        prompts, rows = [], []
        for row, request in enumerate(requests):
            try:
                prompts.append(self.prompt(request, f"chat-request-{row}"))
                rows.append(row)
            except ValueError as error:  # ImageError, PlaceholderMismatchError: this request's own fault
                replies[row] = [ChatReply(None, status="error", detail=f"chat: {error}") for _ in range(n)]
        if prompts:
            decode, stops = self.processor.tokenizer.decode, self.sampling.stop_token_ids
            for row, group in zip(rows, self.engine.generate(prompts, replace(self.sampling, n=n), seed), strict=True):
                replies[row] = [
                    ChatReply(decode([t for t in c.token_ids if t not in stops]), finish_reason=c.finish_reason)
                    for c in group
                ]
        return replies  # type: ignore[return-value]

    def limited(self, max_new_tokens: int) -> EngineChatModel:
        view = copy.copy(self)
        view.sampling = replace(self.sampling, max_new_tokens=max_new_tokens)
        return view

    def prompt(self, request: ChatRequest, key: str) -> Prompt:
        images = [load_image(data, key) for data in request.images]
        sample = self.processor(request.messages, images, add_generation_prompt=True, sample=key)
        return Prompt(key, "chat", sample, request.messages, request.images, reward="")

    def close(self) -> None:
        """Nothing to release before the process ends: the engine goes with this object."""
