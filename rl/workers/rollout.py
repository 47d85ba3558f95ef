"""A rollout engine as a Ray actor: generation, and both ways of receiving weights (see rl/sync.py)."""

from __future__ import annotations

import os
import time

from rl.engines import SamplingParams, build_rollout_engine
from rl.experience import Completion, Prompt
from step3vl_train.cli import quiet_known_warnings


class RolloutWorker:
    def __init__(self, engine: str, **kwargs):
        quiet_known_warnings()  # an actor's process does not inherit the driver's filters
        self.engine = build_rollout_engine(engine, **kwargs)

    def pid(self) -> int:
        return os.getpid()

    def generate(
        self, prompts: list[Prompt], sampling: SamplingParams, seed: int
    ) -> tuple[list[list[Completion]], float]:
        started = time.perf_counter()
        return self.engine.generate(prompts, sampling, seed), time.perf_counter() - started

    def load_weights(self, tensors) -> None:
        self.engine.load_weights(tensors)

    def finish_weight_update(self) -> int:
        return self.engine.finish_weight_update()

    # vLLM's weight-transfer control plane (vllm.distributed.weight_transfer.clients.RayVLLMWeightSyncClient)
    def init_weight_transfer_engine(self, request) -> None:
        self.engine.init_weight_transfer_engine(request)

    def start_weight_update(self) -> None:
        self.engine.start_weight_update()

    def update_weights(self, request) -> None:
        self.engine.update_weights(request)

    def shutdown_weight_transfer_engine(self) -> None:
        self.engine.shutdown_weight_transfer_engine()

    def sleep(self) -> None:
        self.engine.sleep()

    def wake_up(self) -> None:
        self.engine.wake_up()
