"""The peers' timer: a Trainer callback that keeps each optimizer step's end time and one logged figure."""

import time

from transformers import TrainerCallback


class StepClock(TrainerCallback):
    def __init__(self, figure: str):
        self.figure = figure  # the logged key kept: "loss" (Trainer), "reward" (GRPOTrainer)
        self.ends: list[float] = []
        self.values: list[float] = []

    def on_step_end(self, args, state, control, **kwargs):
        self.ends.append(time.perf_counter())

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and self.figure in logs:
            self.values.append(float(logs[self.figure]))

    def step_seconds(self) -> list[float]:
        return [b - a for a, b in zip(self.ends, self.ends[1:], strict=False)]
