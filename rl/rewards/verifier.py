"""A model as answer verifier, behind an OpenAI-compatible chat endpoint (vLLM, SGLang, a hosted API).

The paper used GPT-OSS-120B for checkable answers that rules cannot parse, and its verifier penalises a
right answer reached through flawed reasoning: the model is shown the response's reasoning and its final
answer (`verifier_protocol.py`) and replies CORRECT (1), INCORRECT (0) or INJECTION (0, status
"injection"). A reply that is not a verdict is status "error", left out of the update. The openai client
retries errors and timeouts, and a thread pool caps the requests in flight.
"""

from __future__ import annotations

import os
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

from rl.rewards.types import RewardRequest, RewardResult
from rl.rewards.verifier_protocol import injection_attempt, read_verdict, verifier_prompt


@dataclass
class VerifierConfig:
    base_url: str | None = None  # e.g. http://host:8000/v1; required when a sample names the verifier
    model: str = "openai/gpt-oss-120b"
    api_key_env: str = "VERIFIER_API_KEY"  # the variable holding the key; unset means "EMPTY" (vLLM)
    timeout_s: float = 60.0  # per request
    max_retries: int = 3  # on connection errors, timeouts, 429 and 5xx (the openai client's policy)
    max_concurrency: int = 32
    max_tokens: int = 1024  # of the reply, a reasoning model's reasoning included
    max_reply_chars: int = 64  # the reply's content, stripped: a longer one is no verdict ("error")
    # Head and tail kept around a marked elision, so a 20K-token reasoning fits the verifier's context.
    max_reasoning_chars: int = 32000
    max_answer_chars: int = 4000


def openai_client(config: VerifierConfig):
    """The client of an endpoint: its key read from `api_key_env`, its per-request timeout and retries."""
    from openai import OpenAI

    return OpenAI(
        base_url=config.base_url,
        api_key=os.environ.get(config.api_key_env, "EMPTY"),
        timeout=config.timeout_s,
        max_retries=config.max_retries,
    )


class Verifier:
    def __init__(self, config: VerifierConfig):
        if not config.base_url:
            raise ValueError("reward.verifier.base_url is not set, but a sample asks for the verifier")
        self.config = config
        self.client = openai_client(config)
        self.threads = ThreadPoolExecutor(config.max_concurrency, thread_name_prefix="verifier")

    def submit(self, request: RewardRequest) -> Future[RewardResult]:
        return self.threads.submit(self.score_one, request)

    def score_one(self, request: RewardRequest) -> RewardResult:
        from openai import APIError, APITimeoutError

        attempt = injection_attempt(request.response)
        if attempt is not None:
            return RewardResult(0.0, "injection", f"the response addresses its grader: {attempt!r}")
        prompt = verifier_prompt(request, self.config.max_reasoning_chars, self.config.max_answer_chars)
        try:
            completion = self.client.chat.completions.create(
                model=self.config.model,
                messages=[{"role": "user", "content": prompt}],
                temperature=0.0,
                max_tokens=self.config.max_tokens,
            )
        except APITimeoutError as error:
            return RewardResult(0.0, "timeout", f"verifier: {error}")
        except APIError as error:
            return RewardResult(0.0, "error", f"verifier: {error}")
        # Only `content` is the reply: a reasoning model's `reasoning_content` is never read for a verdict.
        content = completion.choices[0].message.content if completion.choices else None
        try:
            verdict = read_verdict(content, self.config.max_reply_chars)
        except ValueError as error:
            return RewardResult(0.0, "error", f"verifier: {error}")
        if verdict == "INJECTION":
            return RewardResult(0.0, "injection", "the verifier found the response addressing its grader")
        return RewardResult(float(verdict == "CORRECT"), detail=f"verifier: {verdict}")

    def close(self) -> None:
        self.threads.shutdown(wait=False, cancel_futures=True)
        self.client.close()
