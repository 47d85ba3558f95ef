"""A model as answer verifier, behind an OpenAI-compatible chat endpoint (vLLM, SGLang, a hosted API).

The paper used GPT-OSS-120B for checkable answers that rules cannot parse. The model is asked whether the
response's final answer matches the reference and replies with a verdict; the openai client retries
errors and timeouts, and a thread pool caps the requests in flight.
"""

from __future__ import annotations

import os
import re
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

from rl.rewards.answer import split_reasoning
from rl.rewards.types import RewardRequest, RewardResult

PROMPT = """You check answers. Decide whether the RESPONSE's final answer means the same as the REFERENCE \
answer for the QUESTION (equal values in any notation or form count as the same).
QUESTION: {question}
REFERENCE: {reference}
RESPONSE: {response}
Reply with exactly one word: CORRECT or INCORRECT."""
VERDICT = re.compile(r"\b(CORRECT|INCORRECT)\b")


@dataclass
class VerifierConfig:
    base_url: str | None = None  # e.g. http://host:8000/v1; required when a sample names the verifier
    model: str = "openai/gpt-oss-120b"
    api_key_env: str = "VERIFIER_API_KEY"  # the variable holding the key; unset means "EMPTY" (vLLM)
    timeout_s: float = 60.0  # per request
    max_retries: int = 3  # on connection errors, timeouts, 429 and 5xx (the openai client's policy)
    max_concurrency: int = 32
    max_tokens: int = 1024


class Verifier:
    def __init__(self, config: VerifierConfig):
        from openai import OpenAI

        if not config.base_url:
            raise ValueError("reward.verifier.base_url is not set, but a sample asks for the verifier")
        self.config = config
        self.client = OpenAI(
            base_url=config.base_url,
            api_key=os.environ.get(config.api_key_env, "EMPTY"),
            timeout=config.timeout_s,
            max_retries=config.max_retries,
        )
        self.threads = ThreadPoolExecutor(config.max_concurrency, thread_name_prefix="verifier")

    def submit(self, request: RewardRequest) -> Future[RewardResult]:
        return self.threads.submit(self.score_one, request)

    def score_one(self, request: RewardRequest) -> RewardResult:
        from openai import APIError, APITimeoutError

        final = split_reasoning(request.response)[1].strip()
        prompt = PROMPT.format(question=request.prompt, reference=request.answer, response=final)
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
        verdicts = VERDICT.findall(completion.choices[0].message.content or "")
        if not verdicts:
            return RewardResult(0.0, "error", "verifier gave no verdict")
        return RewardResult(float(verdicts[-1] == "CORRECT"))

    def close(self) -> None:
        self.threads.shutdown(wait=False, cancel_futures=True)
        self.client.close()
