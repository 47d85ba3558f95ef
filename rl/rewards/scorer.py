"""Scores a batch of responses: guards against obvious reward hacking, then each reward in a worker
process with a per-call timeout, or remotely: the verifier endpoint, or the reward-model service (RLHF).
A hang, a crash or an exception is counted by its status and leaves the response out of the update; it
is never a silent 0."""

from __future__ import annotations

import logging
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from typing import Any

from pebble import ProcessExpired, ProcessPool

from rl.rewards.answer import boxed_contents, split_reasoning
from rl.rewards.registry import REMOTE, REWARD_MODEL, VERIFIER, resolve
from rl.rewards.rm_client import RewardModelClient, ServiceClientConfig
from rl.rewards.types import NoAnswerError, RewardRequest, RewardResult
from rl.rewards.verifier import Verifier, VerifierConfig

logger = logging.getLogger("rl.rewards")


@dataclass
class RewardConfig:
    num_workers: int = 2  # reward processes
    timeout_s: float = 10.0  # per response; a reward still running then is killed and counted as a timeout
    require_reasoning: bool = True  # a response with no `</think>` (or nothing before it) scores 0
    # A response cut at the length limit scores this, whatever its answer; None: its reward runs on it as on
    # any other (TRL's and verl's behaviour). `truncated_fraction` counts them either way.
    truncated_score: float | None = 0.0
    fn: str | None = None  # one reward for every sample, overriding their `reward` fields (`pkg.mod:fn`)
    options: dict[str, dict[str, Any]] = field(default_factory=dict)  # keyword arguments by reward name
    # Rewards whose unreadable answers ("no_answer") go to the verifier, as the paper did with GPT-OSS-120B
    # for checkable answers rules cannot parse. Off, with a warning, while `verifier.base_url` is unset.
    verifier_fallback: list[str] = field(default_factory=list)
    verifier: VerifierConfig = field(default_factory=VerifierConfig)
    service: ServiceClientConfig = field(default_factory=ServiceClientConfig)  # samples with reward: reward_model


def guard(request: RewardRequest, config: RewardConfig, boxed: bool) -> RewardResult | None:
    """The result for a response that must not reach its reward, or None."""
    if request.truncated and config.truncated_score is not None:
        return RewardResult(config.truncated_score, "truncated")
    reasoning, final = split_reasoning(request.response)
    if config.require_reasoning and not (reasoning and reasoning.strip()):
        return RewardResult(0.0, "no_reasoning")
    if boxed and len(boxed_contents(final)) > 1:
        return RewardResult(0.0, "multiple_answers")
    return None


def run_reward(name: str, request: RewardRequest, options: dict[str, Any]) -> RewardResult:
    """In a worker process: one reward, its exceptions turned into statuses."""
    try:
        score = float(resolve(name).fn(request, **options))
    except NoAnswerError as error:
        return RewardResult(0.0, "no_answer", str(error))
    if not 0.0 <= score <= 1.0:
        return RewardResult(0.0, "error", f"reward {name} returned {score}, outside [0, 1]")
    return RewardResult(score)


class RewardScorer:
    def __init__(self, config: RewardConfig, service_url: str | None = None, service_token: str | None = None):
        """`service_url` and `service_token`: a reward-model service this run started (`service.launch`)."""
        for name in config.verifier_fallback:
            resolve(name)  # a misspelt name fails now, not at the first unreadable answer
        self.fallback = list(config.verifier_fallback)
        if self.fallback and not config.verifier.base_url:
            # `+recipe=rlvr` names a fallback; a run without a verifier endpoint still runs, told so.
            logger.warning(
                "reward.verifier_fallback=%s is off: reward.verifier.base_url (or VERIFIER_URL) is not set, "
                "so their unreadable answers stay no_answer",
                self.fallback,
            )
            self.fallback = []
        self.config = config
        self.pool = ProcessPool(max_workers=config.num_workers)
        self.verifier: Verifier | None = None
        self.service: RewardModelClient | None = None
        self.service_url, self.service_token = service_url, service_token

    def score(self, requests: list[RewardRequest]) -> list[RewardResult]:
        """Rule rewards run in the process pool while the verifier's requests are in flight; answers a rule
        in `verifier_fallback` could not read then go to the verifier too."""
        results: list[RewardResult | None] = [None] * len(requests)
        names = [self.config.fn or request.reward for request in requests]
        futures, remote, to_service = {}, {}, []
        for index, (request, name) in enumerate(zip(requests, names, strict=True)):
            try:
                boxed = name not in REMOTE and resolve(name).boxed
            except KeyError as error:
                results[index] = RewardResult(0.0, "error", str(error))
                continue
            results[index] = guard(request, self.config, boxed)
            if results[index] is not None:
                continue
            if name == VERIFIER:
                remote[index] = self._verifier().submit(request)
            elif name == REWARD_MODEL:
                to_service.append(index)
            else:
                options = self.config.options.get(name, {})
                futures[index] = self.pool.schedule(
                    run_reward, args=(name, request, options), timeout=self.config.timeout_s
                )
        if to_service:  # while the rule rewards run in the pool
            scored = self._service().score([requests[i] for i in to_service])
            for index, result in zip(to_service, scored, strict=True):
                results[index] = result
        for index, future in futures.items():
            results[index] = self._collect(future, requests[index])
            if results[index].status == "no_answer" and names[index] in self.fallback:
                remote[index] = self._verifier().submit(requests[index])
        for index, future in remote.items():
            results[index] = future.result()
        return results  # type: ignore[return-value]

    def _service(self) -> RewardModelClient:
        self.service = self.service or RewardModelClient(self.config.service, self.service_url, self.service_token)
        return self.service

    def service_stats(self) -> dict[str, float]:
        """The reward-model service's latency and retries over the last `score` call; {} without one."""
        return self.service.stats.row() if self.service is not None else {}

    def _verifier(self) -> Verifier:
        self.verifier = self.verifier or Verifier(self.config.verifier)
        return self.verifier

    def _collect(self, future, request: RewardRequest) -> RewardResult:
        try:
            return future.result()
        except FutureTimeout:
            result = RewardResult(0.0, "timeout", f"{request.reward} ran past {self.config.timeout_s} s")
        except ProcessExpired as error:
            result = RewardResult(0.0, "error", f"{request.reward}: the reward process died ({error})")
        except Exception as error:  # noqa: BLE001 - any failure of a reward is counted, never raised
            result = RewardResult(0.0, "error", f"{request.reward}: {type(error).__name__}: {error}")
        logger.warning("reward %s: %s", result.status, result.detail)
        return result

    def close(self) -> None:
        self.pool.stop()
        self.pool.join()
        if self.verifier is not None:
            self.verifier.close()
        if self.service is not None:
            self.service.close()
