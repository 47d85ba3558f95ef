"""Accuracy and its 95% confidence interval, clustered by problem.

A problem's score is the mean of its scored responses; the accuracy is the mean of those over problems,
and its standard error the standard deviation of the problem scores (n - 1) over sqrt(n). The samples of
one problem are not independent draws (they share its difficulty), so the problem is the unit: treating
every response as independent would narrow the interval by up to sqrt(samples) on a benchmark whose
problems are each either always or never solved. The interval is the normal one, mean +- 1.96 SE (the
central limit over problems; benchmarks hold hundreds), clipped to [0, 1]. With one sample a problem it
is the usual binomial interval over problems."""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

Z95 = 1.959963984540054  # the standard normal's 97.5% quantile


@dataclass
class ProblemScores:
    """One problem's responses in one mode, as the summary needs them."""

    scores: list[float | None]  # None: the scorer failed (no verdict on the model), left out
    statuses: list[str]

    @classmethod
    def of(cls, line: dict[str, Any]) -> ProblemScores:
        """From a results.jsonl line."""
        return cls([r["score"] for r in line["responses"]], [r["status"] for r in line["responses"]])


@dataclass
class Accuracy:
    mean: float | None  # None: nothing scored
    ci95: list[float] | None  # [low, high]; None below two scored problems
    problems: int  # problems with a scored response


def accuracy(problem_scores: list[list[float]]) -> Accuracy:
    """`problem_scores`: each problem's scores (a problem with none is left out)."""
    means = [sum(scores) / len(scores) for scores in problem_scores if scores]
    count = len(means)
    if count == 0:
        return Accuracy(None, None, 0)
    mean = sum(means) / count
    if count == 1:
        return Accuracy(mean, None, 1)
    half = Z95 * math.sqrt(sum((m - mean) ** 2 for m in means) / (count - 1) / count)
    return Accuracy(mean, [max(0.0, mean - half), min(1.0, mean + half)], count)


@dataclass
class ModeSummary:
    problems: list[ProblemScores] = field(default_factory=list)  # every problem read, whichever run scored it
    run_now: int = 0  # problems this run scored

    def row(self, calls: int) -> dict[str, Any]:
        """summary.json's figures of the mode; `calls`: the replies this run asked for."""
        scored = [[s for s in p.scores if s is not None] for p in self.problems]
        result = accuracy(scored)
        return {
            "accuracy": result.mean,
            "ci95": result.ci95,
            "problems": len(self.problems),
            "samples": sum(len(p.scores) for p in self.problems),
            "scored": sum(map(len, scored)),
            "scored_problems": result.problems,
            "statuses": dict(Counter(s for p in self.problems for s in p.statuses)),
            "problems_this_run": self.run_now,
            "calls": calls,
        }
