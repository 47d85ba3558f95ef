"""A rollout engine as a Ray actor."""

from __future__ import annotations

import os
import time

from rl.engines import SamplingParams, build_rollout_engine
from rl.experience import Completion, Prompt


class RolloutWorker:
    def __init__(self, engine: str, **kwargs):
        self.engine = build_rollout_engine(engine, **kwargs)

    def generate(
        self, prompts: list[Prompt], sampling: SamplingParams, seed: int
    ) -> tuple[list[list[Completion]], float]:
        started = time.perf_counter()
        return self.engine.generate(prompts, sampling, seed), time.perf_counter() - started

    def pid(self) -> int:
        return os.getpid()

    def update_weights(self, tensors) -> None:
        self.engine.update_weights(tensors)

    def finish_update(self) -> int:
        return self.engine.finish_update()

    def sleep(self) -> None:
        self.engine.sleep()

    def wake_up(self) -> None:
        self.engine.wake_up()
