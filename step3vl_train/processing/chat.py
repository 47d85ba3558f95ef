"""Chat rendering with the reasoning format, and the loss mask over what the assistant writes.

The released `chat_template.jinja` could not be read (spec section 4), so we ship a ChatML template with
`<think>` reasoning; an assistant message carries its reasoning in `reasoning_content`. Pass another
template to render a different format; it needs `{% generation %}` markers for the loss mask.
"""

from __future__ import annotations

from importlib import resources
from typing import Any

from transformers import PreTrainedTokenizerBase

REASONING_CHAT_TEMPLATE = (resources.files("step3vl_train.processing") / "assets" / "chat_template.jinja").read_text()
THINK_END = "</think>"


def split_reasoning(response: str) -> tuple[str | None, str]:
    """(reasoning, final answer): the text before and after the last `</think>`; (None, response) without one."""
    if THINK_END not in response:
        return None, response
    reasoning, _, final = response.rpartition(THINK_END)
    return reasoning, final


def answer_text(response: str) -> str:
    """What a reward model judges of a response: its final answer, stripped (reasoning is never scored)."""
    return split_reasoning(response)[1].strip()


def render_chat(
    tokenizer: PreTrainedTokenizerBase,
    messages: list[dict[str, Any]],
    add_generation_prompt: bool = False,
    chat_template: str = REASONING_CHAT_TEMPLATE,
) -> tuple[list[int], list[int]]:
    """Token ids of the conversation and a 0/1 mask, 1 on the tokens the assistant turns generate
    (reasoning, `</think>`, answer and `<|im_end|>`). Images stay single `<im_patch>` placeholders."""
    rendered = tokenizer.apply_chat_template(
        messages,
        chat_template=chat_template,
        add_generation_prompt=add_generation_prompt,
        tokenize=True,
        return_dict=True,
        return_assistant_tokens_mask=True,
    )
    return list(rendered["input_ids"]), list(rendered["assistant_masks"])
