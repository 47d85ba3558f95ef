"""The synthesis prompt (spec 6.3): the official jinja2 template, rendered with jinja2's defaults so the
string is byte for byte the official one; and the synthesis conversation built around it."""

from __future__ import annotations

import copy
from importlib import resources
from typing import Any

import jinja2

from step3vl_train.processing.chat import split_reasoning

TEMPLATE = jinja2.Template((resources.files("rl.pacore") / "templates" / "synthesis.jinja").read_text())


def render(original_prompt: str, references: list[str]) -> str:
    """The synthesis prompt; with no references the template is bypassed and the problem is the prompt."""
    if not references:
        return original_prompt
    return TEMPLATE.render(original_prompt=original_prompt, ref_responses=references)


def conclusion(response: str) -> str:
    """What a rollout passes on: the text after its last `</think>` (all of it when there is none)."""
    return split_reasoning(response)[1]


def last_user_index(messages: list[dict[str, Any]]) -> int:
    for index in range(len(messages) - 1, -1, -1):
        if messages[index]["role"] == "user":
            return index
    raise ValueError("the conversation has no user message")


def original_prompt(messages: list[dict[str, Any]]) -> str:
    """The text of the last user message (its text parts joined by newlines): the template's problem."""
    content = messages[last_user_index(messages)]["content"]
    if isinstance(content, str):
        return content
    return "\n".join(part["text"] for part in content if part.get("type") == "text")


def synthesis_messages(messages: list[dict[str, Any]], references: list[str]) -> list[dict[str, Any]]:
    """The conversation of the synthesis round: a copy in which the rendered prompt replaces the text of the
    last user message, at the place of its first text part; its images stay where they were, and earlier
    turns are kept. With no references, the conversation as it is."""
    out = copy.deepcopy(messages)
    if not references:
        return out
    index = last_user_index(out)
    text = render(original_prompt(out), references)
    content = out[index]["content"]
    if isinstance(content, str):
        out[index]["content"] = text
        return out
    parts, placed = [], False
    for part in content:
        if part.get("type") != "text":
            parts.append(part)
        elif not placed:
            parts.append({"type": "text", "text": text})
            placed = True
    if not placed:
        parts.append({"type": "text", "text": text})
    out[index]["content"] = parts
    return out
