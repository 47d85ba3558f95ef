"""A rollout engine as a Ray actor: generation, and both ways of receiving weights (see rl/sync.py).

A weight update that fails in the engine is kept (`sync_failure`) as well as raised: under NCCL the
trainer's sender never sees the error (it waits in the broadcast), so the driver asks the engines which
one failed once the sync's deadline has passed."""

from __future__ import annotations

import functools
import os
import time

from rl.engines import SamplingParams, build_rollout_engine
from rl.experience import Completion, Prompt
from step3vl_train.cli import quiet_known_warnings


def kept_failure(method):
    """Records the exception a weight-update step raises in `self.failure` (one line), and raises it."""

    @functools.wraps(method)
    def recorded(self, *args, **kwargs):
        try:
            return method(self, *args, **kwargs)
        except Exception as error:
            self.failure = f"{method.__name__}: {type(error).__name__}: {' '.join(str(error).split())}"[:500]
            raise

    return recorded


class RolloutWorker:
    def __init__(self, engine: str, **kwargs):
        quiet_known_warnings()  # an actor's process does not inherit the driver's filters
        self.engine = build_rollout_engine(engine, **kwargs)
        self.failure: str | None = None

    def pid(self) -> int:
        return os.getpid()

    def sync_failure(self) -> str | None:
        """How the last weight update failed here, if it did."""
        return self.failure

    def generate(
        self, prompts: list[Prompt], sampling: SamplingParams, seed: int
    ) -> tuple[list[list[Completion]], float]:
        started = time.perf_counter()
        return self.engine.generate(prompts, sampling, seed), time.perf_counter() - started

    def generate_rows(
        self, rows: list[tuple[Prompt, Completion | None]], sampling: SamplingParams, seed: int, groups, enough: int
    ) -> tuple[list[Completion], float]:
        started = time.perf_counter()
        return self.engine.generate_rows(rows, sampling, seed, groups, enough), time.perf_counter() - started

    # rollout.partial: called from a second thread of the actor while a generation runs
    def pause_generation(self) -> None:
        self.engine.pause_generation()

    def resume_generation(self) -> None:
        self.engine.resume_generation()

    @kept_failure
    def load_weights(self, tensors) -> None:
        self.engine.load_weights(tensors)

    @kept_failure
    def finish_weight_update(self) -> int:
        return self.engine.finish_weight_update()

    # vLLM's weight-transfer control plane (vllm.distributed.weight_transfer.clients.RayVLLMWeightSyncClient)
    @kept_failure
    def init_weight_transfer_engine(self, request) -> None:
        self.engine.init_weight_transfer_engine(request)

    @kept_failure
    def start_weight_update(self) -> None:
        self.engine.start_weight_update()

    @kept_failure
    def update_weights(self, request) -> None:
        self.engine.update_weights(request)

    def shutdown_weight_transfer_engine(self) -> None:
        self.engine.shutdown_weight_transfer_engine()

    def sleep(self) -> None:
        self.engine.sleep()

    @kept_failure
    def wake_up(self, tags: list[str] | None = None) -> None:
        self.engine.wake_up(tags)
