"""How old the policy that sampled each trained token is (`algo.max_staleness`), for the losses and the
metrics. The policy an iteration trains is version `step - 1`; a token sampled by version v is `step - 1 - v`
versions old."""

from __future__ import annotations

from collections import Counter

from rl.experience import Response


def mark_ages(responses: list[Response], version: int, max_staleness: int) -> None:
    """Each response's leading tokens sampled before `version` (`Response.behind`), and those of them more than
    `max_staleness` versions before it, which stay out of the losses (`Response.stale`)."""
    for response in responses:
        response.behind = sum(count for v, count in response.completion.versions if v < version)
        response.stale = sum(count for v, count in response.completion.versions if version - v > max_staleness)


def staleness_metrics(responses: list[Response], version: int) -> dict[str, float]:
    """Over the valid responses' tokens: their mean and largest age, the share of each age
    (`staleness/age_<a>`), and the share left out of the losses."""
    ages: Counter[int] = Counter()
    for response in responses:
        if response.valid:
            for v, count in response.completion.versions:
                ages[version - v] += count
    tokens = sum(ages.values())
    if not tokens:
        return {}
    left_out = sum(r.stale for r in responses if r.valid)
    return {
        "staleness/mean": sum(age * count for age, count in ages.items()) / tokens,
        "staleness/max": max(ages),
        **{f"staleness/age_{age}": count / tokens for age, count in sorted(ages.items())},
        "staleness/left_out": left_out / tokens,
    }
