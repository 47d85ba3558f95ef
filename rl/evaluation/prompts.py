"""A benchmark's problems: each sample, its last user turn put in the benchmark's prompt template (the
report's Appendix C), with the benchmark's reward."""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from rl.evaluation.config import BenchmarkConfig
from rl.pacore.inference import Problem, read_problem
from rl.pacore.template import last_user_index, original_prompt
from step3vl_train.data.schema import Sample
from step3vl_train.data.skips import SkippedSample

QUESTION = "{question}"
IMAGE = "<image>"


def apply_template(messages: list[dict[str, Any]], template: str) -> list[dict[str, Any]]:
    """A copy of `messages` whose last user turn is `template` as written: `{question}` replaced by that
    turn's text (its text parts joined by newlines), and its images, in order, where `<image>` stands. One
    `<image>` takes them all; several take one each; none puts them before the text. Earlier turns are
    kept. Raises ValueError when the images do not fit the template's `<image>`s."""
    out = copy.deepcopy(messages)
    index = last_user_index(out)
    content = out[index]["content"]
    images = [] if isinstance(content, str) else [part for part in content if part.get("type") == "image"]
    # Split before filling in the question: a question that quotes "<image>" is text, not a place.
    pieces = template.split(IMAGE)
    places = len(pieces) - 1
    if places > 1 and places != len(images):
        raise ValueError(f"the template has {places} {IMAGE}s but the turn {len(images)} image(s)")
    if places == 0:
        pieces, places = ["", *pieces], 1
    question = original_prompt(out)
    parts: list[dict[str, Any]] = []
    for position, piece in enumerate(pieces):
        if position > 0:
            parts += images if places == 1 else [images[position - 1]]
        if piece:
            parts.append({"type": "text", "text": piece.replace(QUESTION, question)})
    out[index]["content"] = parts
    return out


def problem_reader(bench: BenchmarkConfig, reward_fn: str | None) -> Callable[[Sample, str], Problem]:
    """What reads a sample into a problem (for `MixedSamples.take`). Its reward: `reward.fn`, else the
    benchmark's, else the sample's own; a sample with none is skipped (`bad_schema`), as is one whose
    images do not fit the template (`placeholder_mismatch`)."""

    def read(sample: Sample, source: str) -> Problem:
        reward = reward_fn or bench.reward or sample.reward
        if not reward:
            raise SkippedSample("bad_schema", sample.key, "no `reward` field, and neither bench.reward nor reward.fn")
        messages = sample.messages
        if bench.template is not None and messages is not None and messages[-1]["role"] == "user":
            try:
                messages = apply_template(messages, bench.template)
            except ValueError as error:
                raise SkippedSample("placeholder_mismatch", sample.key, str(error)) from error
        return read_problem(replace(sample, messages=messages, reward=reward), source)

    return read
