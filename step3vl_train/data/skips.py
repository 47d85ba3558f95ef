"""Why a sample or shard is left out. Every skip is counted by reason and logged with the sample's key."""

from __future__ import annotations

import logging

logger = logging.getLogger("step3vl_train.data")

SKIP_REASONS = (
    "malformed_json",  # the sample's JSON does not parse
    "bad_schema",  # parses, but breaks the sample schema (docs/data.md)
    "missing_image",  # the JSON has an image its sample lacks
    "corrupt_image",  # an image that does not decode
    "placeholder_mismatch",  # more images than `{"type": "image"}` parts, or the chat template lost one
    "too_long",  # longer than the sequence length under `overflow: skip`, or nothing left to learn once cut
    "too_many_images",  # more images or ViT views than one pack may hold
    "unreadable_shard",  # a shard that cannot be opened or ends mid-sample; counted once a shard
)


class SkippedSample(Exception):
    """Raised where a sample (or shard) is found unusable; `reason` is one of SKIP_REASONS."""

    def __init__(self, reason: str, key: str, detail: str):
        if reason not in SKIP_REASONS:
            raise ValueError(f"unknown skip reason {reason!r}")
        super().__init__(f"{key}: {reason}: {detail}")
        self.reason = reason
        self.key = key
        self.detail = detail

    def log(self) -> None:
        logger.warning("skipped %s (%s): %s", self.key, self.reason, self.detail)
