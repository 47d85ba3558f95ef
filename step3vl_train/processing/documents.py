"""Plain documents for pre-training: text, optionally interleaved with images, learned in full.

A document is a string or a list of content parts (`{"type": "text", "text": ...}`, `{"type": "image"}`).
It is tokenised without a chat template and ends with `<|endoftext|>`, Qwen's document separator.
"""

from __future__ import annotations

from typing import Any

from transformers import PreTrainedTokenizerBase

END_OF_TEXT = "<|endoftext|>"


def render_document(
    tokenizer: PreTrainedTokenizerBase, document: str | list[dict[str, Any]], image_placeholder_id: int
) -> tuple[list[int], list[int]]:
    """Token ids and a 0/1 loss mask: 1 on every text token and the final `<|endoftext|>`, 0 on the single
    placeholder each image gets (expanded later)."""
    parts = [{"type": "text", "text": document}] if isinstance(document, str) else document
    ids: list[int] = []
    mask: list[int] = []
    for part in parts:
        if part["type"] == "image":
            ids.append(image_placeholder_id)
            mask.append(0)
        else:
            text_ids = tokenizer(part["text"], add_special_tokens=False)["input_ids"]
            ids += text_ids
            mask += [1] * len(text_ids)
    end = tokenizer.get_vocab().get(END_OF_TEXT)
    if end is None:
        raise ValueError(f"the tokenizer has no {END_OF_TEXT} token to end documents with")
    return ids + [end], mask + [1]
