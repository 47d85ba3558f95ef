"""A run in phases: pre-training's 900B tokens of one mixture and learning-rate leg, then 300B of another,
as one run with one optimizer and one data position.

The first phase is `data.sources` (their weights) with `optim.schedule`; `phases.NAME` entries take over
at their `start_tokens`. The learning rate follows the tokens trained (train/schedule.py). The mixture
switches in the data workers: at the first step whose tokens reach a phase's start, the trainer hands
the loader the phase (data/loader.py), and each worker, after the window it is packing, draws in the
phase's weights with its counts reset, its readers going on where they were, so no sample is read twice.
"""

from __future__ import annotations

from dataclasses import dataclass

from step3vl_train.data.config import SourceConfig
from step3vl_train.train.config import DecayConfig, PhaseConfig
from step3vl_train.usage import UsageError

FIRST = "first"  # the name the first phase (data.sources with optim.schedule) goes by in messages


@dataclass
class Phase:
    name: str
    start_tokens: int
    weights: dict[str, float]  # by source name, every source named (0: not read)
    decay: DecayConfig | None  # None for the first phase, whose schedule is optim.schedule


def run_phases(sources: list[SourceConfig], phases: dict[str, PhaseConfig]) -> list[Phase]:
    """The run's phases in order of their start, checked against the data sources."""
    names = [source.name for source in sources]
    ordered = [Phase(FIRST, 0, {source.name: source.weight for source in sources}, None)]
    for name, phase in sorted(phases.items(), key=lambda item: item[1].start_tokens):
        unknown = sorted(set(phase.weights) - set(names))
        if unknown:
            raise UsageError(
                f"phases.{name}.weights names {unknown}, which are not data sources: {names}. Weigh these "
                f"sources in phases.{name}.weights, or run without the phase: ~phases.{name}"
            )
        if phase.weights and (any(w < 0 for w in phase.weights.values()) or not any(phase.weights.values())):
            raise UsageError(f"phases.{name}.weights needs a positive weight and none negative: {phase.weights}")
        if phase.start_tokens <= ordered[-1].start_tokens:
            raise UsageError(f"phases.{name}.start_tokens must be positive and unlike any other phase's")
        weights = {source: phase.weights.get(source, 0.0) for source in names} if phase.weights else ordered[-1].weights
        ordered.append(Phase(name, phase.start_tokens, weights, phase.schedule))
    return ordered


def phase_at(phases: list[Phase], tokens: int) -> int:
    """The index of the phase a run that has trained `tokens` is in."""
    return max(index for index, phase in enumerate(phases) if phase.start_tokens <= tokens)


def schedule_legs(phases: list[Phase]) -> list[tuple[int, DecayConfig]]:
    """The later phases' (start, schedule), for `lr_factor`."""
    return [(phase.start_tokens, phase.decay) for phase in phases[1:]]


def phase_named(phases: list[Phase], name: str) -> int:
    for index, phase in enumerate(phases):
        if phase.name == name and index > 0:
            return index
    raise UsageError(f"trainer.start_phase={name} is not one of the later phases: {[p.name for p in phases[1:]]}")
