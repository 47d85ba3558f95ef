"""The reward-model service's wire format: what `POST /v1/score` takes and returns (docs/rm_service.md).

A request is `{"items": [ITEM, ...]}`; an item is

    {"id": "step3/17",                         # optional: echoed back; default the item's index
     "messages": [...],                        # the prompt (docs/data.md schema), ending with a user turn
     "images": ["<base64>", ...],              # one per {"type": "image"} part, in order
     "response": "...",                        # the policy's response, reasoning included
     "reference": "..."}                       # a stronger model's response: required by backends that compare

and the reply is `{"results": [RESULT, ...], "latency_s": ...}`, one result per item in order:

    {"id": ..., "score": 0.73 or null, "status": "ok", "components": {"rm": 0.8, "language": 0.0, ...}, "detail": ""}

`score` is null unless the status is one the policy earned (rl.rewards.types.STATUSES); a failure of the
service or its backend ("timeout", "error", "unparsed") is never a score.
"""

from __future__ import annotations

import base64
import binascii
import json
import sys
from dataclasses import dataclass, field
from typing import Any

from step3vl_train.data.schema import build_sample
from step3vl_train.data.skips import SkippedSample

ITEM_FIELDS = ("id", "messages", "images", "response", "reference")


class BadRequest(ValueError):
    """A request the service refuses with 400; the message names the item at fault."""


@dataclass
class ScoreItem:
    id: str
    messages: list[dict[str, Any]]
    images: list[bytes]
    response: str
    reference: str | None = None


@dataclass
class ItemScore:
    """A backend's or the service's verdict on one item. `preference` in [0, 1] (0.5: as good as the
    reference, or neutral); None unless `status` is "ok"."""

    preference: float | None
    status: str = "ok"
    components: dict[str, float] = field(default_factory=dict)
    detail: str = ""


def parse_request(body: bytes, max_items: int, needs_reference: bool) -> list[ScoreItem]:
    """The items of a request body; raises BadRequest naming the first item at fault."""
    try:
        payload = json.loads(body)
    except ValueError as error:  # JSONDecodeError, UnicodeDecodeError, an integer of over 4300 digits
        raise BadRequest(f"the body is not JSON: {error}") from error
    except RecursionError as error:
        # json stops at the interpreter's recursion limit, before reading the rest: a deep body costs little.
        levels = sys.getrecursionlimit()
        raise BadRequest(f"the body nests deeper than the parser goes (about {levels}; a request has 7)") from error
    if not isinstance(payload, dict) or not isinstance(payload.get("items"), list):
        raise BadRequest('the body must be an object with a list "items"')
    items = payload["items"]
    if not items:
        raise BadRequest('"items" is empty')
    if len(items) > max_items:
        raise BadRequest(f"{len(items)} items in one request, over the {max_items} allowed: send smaller batches")
    parsed = [parse_item(index, item, needs_reference) for index, item in enumerate(items)]
    ids = [item.id for item in parsed]
    if len(set(ids)) != len(ids):
        duplicate = next(i for i in ids if ids.count(i) > 1)
        raise BadRequest(f"item id {duplicate!r} occurs more than once")
    return parsed


def parse_item(index: int, item: Any, needs_reference: bool) -> ScoreItem:
    name = f"item {index}"
    if not isinstance(item, dict):
        raise BadRequest(f"{name}: must be an object, not {type(item).__name__}")
    if "id" in item:
        if not isinstance(item["id"], str | int) or isinstance(item["id"], bool):
            raise BadRequest(f"{name}: id must be a string or an integer")
        name = f"item {index} (id {item['id']!r})"
    unknown = sorted(set(item) - set(ITEM_FIELDS))
    if unknown:
        raise BadRequest(f"{name}: unknown field(s) {unknown}; an item has {list(ITEM_FIELDS)}")
    if not isinstance(item.get("response"), str):
        raise BadRequest(f"{name}: response must be a string")
    reference = item.get("reference")
    if reference is not None and not isinstance(reference, str):
        raise BadRequest(f"{name}: reference must be a string")
    if needs_reference and reference is None:
        raise BadRequest(f"{name}: this backend compares with a reference response, and the item has none")
    encoded = item.get("images", [])
    if not isinstance(encoded, list) or not all(isinstance(image, str) for image in encoded):
        raise BadRequest(f"{name}: images must be a list of base64 strings")
    images = []
    for position, image in enumerate(encoded):
        try:
            images.append(base64.b64decode(image, validate=True))
        except (binascii.Error, ValueError) as error:
            raise BadRequest(f"{name}: images[{position}] is not base64 ({error})") from error
    messages = item.get("messages")
    try:
        sample = build_sample(name, {"messages": messages}, dict(enumerate(images)))
    except SkippedSample as error:
        raise BadRequest(f"{name}: {error.reason}: {error.detail}") from error
    if messages[-1]["role"] != "user":
        raise BadRequest(f"{name}: messages must end with a user turn")
    return ScoreItem(str(item.get("id", index)), sample.messages, sample.images, item["response"], reference)


def encode_item(item_id: str, messages: list[dict], images: list[bytes], response: str, reference: str | None) -> dict:
    """An item as the client sends it."""
    item = {
        "id": item_id,
        "messages": messages,
        "images": [base64.b64encode(image).decode() for image in images],
        "response": response,
    }
    if reference is not None:
        item["reference"] = reference
    return item


def result_json(item_id: str, score: float | None, verdict: ItemScore) -> dict:
    return {
        "id": item_id,
        "score": score,
        "status": verdict.status,
        "components": verdict.components,
        "detail": verdict.detail,
    }
