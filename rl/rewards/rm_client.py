"""The RL run's side of the reward-model service (rl/serve_rm.py): sends an iteration's responses in
batches, several requests at a time, and turns the replies into RewardResults.

Every wait has a bound. A 503 (the service's queue is full), a 502 or 504 (a proxy between) or a
connection error is retried with exponential backoff (honouring Retry-After) until the iteration's
deadline; the items still unscored then come back "timeout", which leaves them out of the update. A 413
halves the batch. Any other error masks the request's items ("error"), without retrying what would fail
again. A 401 is a mistake in the setup, not a passing failure: it stops the run with a message.
"""

from __future__ import annotations

import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import requests

from rl.rewards.types import RewardRequest, RewardResult
from rl.rm_service.items import encode_item
from rl.rm_service.token import read_bearer_token
from step3vl_train.usage import UsageError


@dataclass
class ServiceClientConfig:
    url: str | None = None  # e.g. http://rm-host:8780; with launch=true, the service this run starts
    launch: bool = False  # start the service (`server`) inside this run's Ray cluster
    token_env: str = "STEP3VL_RM_TOKEN"  # the bearer token: this variable, else token_file
    token_file: str | None = None
    items_per_request: int = 64
    concurrency: int = 8  # requests in flight
    request_timeout_s: float = 300.0  # one HTTP request
    deadline_s: float = 1800.0  # all of an iteration's items; those unscored after it are "timeout"
    backoff_s: float = 0.5  # the first retry's wait, doubled each time up to max_backoff_s
    max_backoff_s: float = 30.0
    server: dict[str, Any] = field(default_factory=dict)  # launch=true: configs/service/ + configs/rm/


TRANSIENT = (502, 503, 504)  # HTTP statuses worth retrying


class ServiceRefused(UsageError):
    """The service refused the token (401): the run's setup is wrong."""


@dataclass
class ClientStats:
    latencies: list[float] = field(default_factory=list)  # seconds, each answered request
    retries: int = 0
    rejected: int = 0  # 503s met

    def row(self) -> dict[str, float]:
        if not self.latencies:
            return {"service/retries": self.retries, "service/rejected": self.rejected}
        return {
            "service/latency_p50": float(np.percentile(self.latencies, 50)),
            "service/latency_p99": float(np.percentile(self.latencies, 99)),
            "service/requests": len(self.latencies),
            "service/retries": self.retries,
            "service/rejected": self.rejected,
        }


class RewardModelClient:
    def __init__(self, config: ServiceClientConfig, url: str | None = None, token: str | None = None):
        self.config = config
        self.url = (url or config.url or "").rstrip("/")
        if not self.url:
            raise UsageError("reward.service.url is not set: give the service's URL, or reward.service.launch=true")
        self.token = token or read_client_token(config)
        self.session = requests.Session()
        self.session.headers["Authorization"] = f"Bearer {self.token}"
        self.threads = ThreadPoolExecutor(config.concurrency, thread_name_prefix="rm-client")
        self.stats = ClientStats()
        self.lock = threading.Lock()

    def score(self, requests_: list[RewardRequest]) -> list[RewardResult]:
        """One result per request, in order: scored, or masked with the status that says why."""
        self.stats = ClientStats()
        deadline = time.monotonic() + self.config.deadline_s
        size = self.config.items_per_request
        chunks = [list(range(start, min(start + size, len(requests_)))) for start in range(0, len(requests_), size)]
        futures = [self.threads.submit(self._post, requests_, chunk, deadline) for chunk in chunks]
        results: list[RewardResult | None] = [None] * len(requests_)
        for future in futures:
            for index, result in future.result().items():
                results[index] = result
        return results  # type: ignore[return-value]

    def _post(self, requests_: list[RewardRequest], chunk: list[int], deadline: float) -> dict[int, RewardResult]:
        body = {"items": [item(str(i), requests_[i]) for i in chunk]}
        wait = self.config.backoff_s
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return {i: RewardResult(0.0, "timeout", "the reward service did not answer in time") for i in chunk}
            started = time.monotonic()
            try:
                reply = self.session.post(
                    f"{self.url}/v1/score", json=body, timeout=min(self.config.request_timeout_s, remaining)
                )
            except requests.RequestException as error:
                status, retry_after, detail = None, None, f"{type(error).__name__}: {error}"
            else:
                status, retry_after, detail = reply.status_code, reply.headers.get("Retry-After"), reply.text[:500]
            if status == 200:
                with self.lock:
                    self.stats.latencies.append(time.monotonic() - started)
                return {int(r["id"]): result(r) for r in reply.json()["results"]}
            if status == 401:
                raise ServiceRefused(f"the reward service at {self.url} refused the token: {detail}")
            if status == 413 and len(chunk) > 1:
                half = len(chunk) // 2
                return self._post(requests_, chunk[:half], deadline) | self._post(requests_, chunk[half:], deadline)
            if status is not None and status not in TRANSIENT:
                return {i: RewardResult(0.0, "error", f"reward service: {status}: {detail}") for i in chunk}
            with self.lock:
                self.stats.retries += 1
                self.stats.rejected += status == 503
            pause = float(retry_after) if retry_after and retry_after.isdigit() else wait
            time.sleep(min(pause * random.uniform(1.0, 1.5), max(deadline - time.monotonic(), 0)))
            wait = min(wait * 2, self.config.max_backoff_s)

    def close(self) -> None:
        self.threads.shutdown(wait=False, cancel_futures=True)
        self.session.close()


def item(item_id: str, request: RewardRequest) -> dict:
    return encode_item(item_id, request.messages or [], request.images, request.response, request.reference)


def result(reply: dict) -> RewardResult:
    score = reply.get("score")
    status = reply["status"] if score is not None or reply["status"] != "ok" else "error"
    return RewardResult(float(score or 0.0), status, reply.get("detail", ""), reply.get("components") or {})


def read_client_token(config: ServiceClientConfig) -> str:
    token = read_bearer_token(config.token_env, config.token_file, "reward.service.token_file")
    if not token:
        raise UsageError(
            f"the reward service needs its bearer token: set {config.token_env} or reward.service.token_file"
        )
    return token
