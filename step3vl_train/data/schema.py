"""The sample schema (docs/data.md): one JSON object a sample, its images beside it.

A sample holds `messages` (OpenAI-style chat, content a string or a list of parts, images as
`{"type": "image"}` parts in order) or `text` (a pre-training document: a string, or a list of text and
image parts). Optional: `source`; for RL prompts `answer`, `reward` (the verifier's name), `boxes`
([x0, y0, x1, y1] in pixels of the sample's first image) and `points` ([x, y]); for RLHF prompts
`reference` (a stronger model's response, the reward model's anchor); for preference pairs (reward-model
training) `chosen` and `rejected`, the preferred and the dispreferred reply to `messages`; for PaCoRe
prompts `pool`, the message pool: earlier rollouts' conclusions, each
`{"text": str, "finished": bool, "reward": float | null, "status": str, "model": str}`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from step3vl_train.data.skips import SkippedSample

ROLES = ("system", "user", "assistant")
OPTIONAL_FIELDS = (
    "source",
    "answer",
    "reward",
    "boxes",
    "points",
    "key",
    "images",
    "reference",
    "chosen",
    "rejected",
    "pool",
)


@dataclass
class Sample:
    key: str
    messages: list[dict[str, Any]] | None  # exactly one of messages and text is set
    text: str | list[dict[str, Any]] | None
    images: list[bytes]  # in the order of the image parts
    source: str | None = None
    answer: Any = None
    reward: str | None = None
    boxes: list[list[float]] = field(default_factory=list)
    points: list[list[float]] = field(default_factory=list)
    reference: str | None = None
    chosen: str | None = None
    rejected: str | None = None
    pool: list[dict[str, Any]] = field(default_factory=list)

    @property
    def num_image_parts(self) -> int:
        return count_image_parts(self.messages if self.messages is not None else self.text)


def count_image_parts(content: Any) -> int:
    if isinstance(content, str):
        return 0
    if isinstance(content, dict):
        return int(content.get("type") == "image") + count_image_parts(content.get("content", ""))
    return sum(count_image_parts(item) for item in content)


def decode_record(key: str, raw: bytes | str | dict[str, Any]) -> dict[str, Any]:
    """The sample's JSON object; raises SkippedSample("malformed_json") if it is not one."""
    if isinstance(raw, dict):
        return raw
    try:
        record = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise SkippedSample("malformed_json", key, str(err)) from err
    if not isinstance(record, dict):
        raise SkippedSample("malformed_json", key, f"top level is a {type(record).__name__}, not an object")
    return record


def build_sample(key: str, record: dict[str, Any], images: dict[int, bytes]) -> Sample:
    """Checks a decoded record against the schema and pairs it with its images (index -> bytes)."""
    unknown = set(record) - {"messages", "text", *OPTIONAL_FIELDS}
    if unknown:
        raise SkippedSample("bad_schema", key, f"unknown field(s) {sorted(unknown)}")
    if ("messages" in record) == ("text" in record):
        raise SkippedSample("bad_schema", key, "needs exactly one of 'messages' and 'text'")
    if "messages" in record:
        _check_messages(key, record["messages"])
    else:
        _check_parts(key, record["text"], "text")
    sample = Sample(
        key=key,
        messages=record.get("messages"),
        text=record.get("text"),
        images=[],
        source=record.get("source"),
        answer=record.get("answer"),
        reward=record.get("reward"),
        boxes=record.get("boxes") or [],
        points=record.get("points") or [],
        reference=record.get("reference"),
        chosen=record.get("chosen"),
        rejected=record.get("rejected"),
        pool=_checked_pool(key, record.get("pool") or []),
    )
    wanted = sample.num_image_parts
    missing = [i for i in range(wanted) if i not in images]
    if missing:
        raise SkippedSample("missing_image", key, f"image(s) {missing} of {wanted} absent")
    extra = sorted(set(images) - set(range(wanted)))
    if extra:
        raise SkippedSample("placeholder_mismatch", key, f"{wanted} image part(s) but image(s) {extra} beside them")
    sample.images = [images[i] for i in range(wanted)]
    return sample


def _check_messages(key: str, messages: Any) -> None:
    if not isinstance(messages, list) or not messages:
        raise SkippedSample("bad_schema", key, "'messages' must be a non-empty list")
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in ROLES:
            raise SkippedSample("bad_schema", key, f"messages[{i}] needs a role in {ROLES}")
        _check_parts(key, message.get("content"), f"messages[{i}].content")
        if "reasoning_content" in message and not isinstance(message["reasoning_content"], str):
            raise SkippedSample("bad_schema", key, f"messages[{i}].reasoning_content must be a string")


def _check_parts(key: str, content: Any, where: str) -> None:
    if isinstance(content, str):
        return
    if not isinstance(content, list):
        raise SkippedSample("bad_schema", key, f"{where} must be a string or a list of parts")
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "image":
            continue
        if kind != "text" or not isinstance(part.get("text"), str):
            raise SkippedSample("bad_schema", key, f"{where}[{j}] must be {{'type': 'text', 'text': str}} or an image")


POOL_ENTRY = {"text": str, "finished": bool, "reward": (int, float, type(None)), "status": str, "model": str}


def _checked_pool(key: str, pool: Any) -> list[dict[str, Any]]:
    if not isinstance(pool, list):
        raise SkippedSample("bad_schema", key, "'pool' must be a list of messages")
    for i, entry in enumerate(pool):
        if not isinstance(entry, dict) or set(entry) != set(POOL_ENTRY):
            raise SkippedSample("bad_schema", key, f"pool[{i}] must have exactly the fields {sorted(POOL_ENTRY)}")
        wrong = [name for name, kind in POOL_ENTRY.items() if not isinstance(entry[name], kind)]
        if wrong:
            raise SkippedSample("bad_schema", key, f"pool[{i}] has field(s) {wrong} of the wrong type")
    return pool
