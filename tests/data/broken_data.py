"""Held-out shards in the documented schema with known broken samples, and the skips they must cause."""

import io
import json
import os
import tarfile

from PIL import Image
from webdataset import TarWriter


def png(width: int = 64, height: int = 48, color=(200, 30, 30)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), color).save(buffer, format="PNG")
    return buffer.getvalue()


def jpeg(width: int = 320, height: int = 240) -> bytes:
    buffer = io.BytesIO()
    Image.effect_noise((width, height), 60).convert("RGB").save(buffer, format="JPEG", quality=95)
    return buffer.getvalue()


def caption(text: str) -> dict:
    return {"text": [{"type": "image"}, {"type": "text", "text": text}]}


def conversation(question: str, answer: str, image: bool = True) -> dict:
    content = ([{"type": "image"}] if image else []) + [{"type": "text", "text": question}]
    return {"messages": [{"role": "user", "content": content}, {"role": "assistant", "content": answer}]}


GOOD = 3  # good samples in the held-out shard
TRUNCATED_GOOD = 2  # whole samples before the cut in the truncated shard
EXPECTED_SKIPS = {
    "malformed_json": 1,
    "bad_schema": 1,
    "missing_image": 1,
    "placeholder_mismatch": 1,
    "corrupt_image": 2,  # one with a garbage header, one that stops mid-stream
    "too_long": 1,
    "too_many_images": 1,
    "unreadable_shard": 2,  # the truncated shard and the missing one
}


def write_held_out(folder: str) -> list[str]:
    """Writes the shards; returns the paths to give a source (the last one does not exist)."""
    os.makedirs(folder, exist_ok=True)
    held_out = os.path.join(folder, "held-out-000000.tar")
    samples = [
        ("good-0", json.dumps(caption("A red square.")).encode(), [("0.png", png())]),
        ("good-1", json.dumps({"text": "A plain document about rivers."}).encode(), []),
        ("malformed", b'{"text": "no end', []),
        ("both-fields", json.dumps({"text": "x", "messages": []}).encode(), []),
        ("missing-image", json.dumps(conversation("Compare.", "Same.") | {"text": None}).encode(), []),
        ("extra-image", json.dumps(caption("One part.")).encode(), [("0.png", png()), ("1.png", png())]),
        ("garbage-image", json.dumps(caption("Noise.")).encode(), [("0.jpg", b"not an image at all")]),
        ("cut-image", json.dumps(caption("Cut.")).encode(), [("0.jpg", jpeg()[:2000])]),
        ("too-long", json.dumps(conversation("word " * 3000, "ok", image=False)).encode(), []),
        (
            "many-images",
            json.dumps({"text": [{"type": "image"}] * 70}).encode(),
            [(f"{i}.png", png(16, 16)) for i in range(70)],
        ),
        ("good-2", json.dumps(conversation("What color?", "Red.")).encode(), [("0.png", png())]),
    ]
    # "missing-image": a conversation whose one image part has no image file beside it.
    samples[4] = ("missing-image", json.dumps(conversation("Describe.", "A square.")).encode(), [])
    with TarWriter(held_out) as writer:
        for key, record, images in samples:
            writer.write({"__key__": key, "json": record, **dict(images)})
    truncated = os.path.join(folder, "truncated-000000.tar")
    with TarWriter(truncated) as writer:
        for i in range(TRUNCATED_GOOD + 1):
            writer.write(
                {"__key__": f"whole-{i}", "json": json.dumps(caption(f"Sample {i}.")).encode(), "0.jpg": jpeg()}
            )
    with tarfile.open(truncated) as tar:
        last = tar.getmembers()[-1]
    with open(truncated, "r+b") as handle:
        handle.truncate(last.offset_data + last.size // 2)
    return [held_out, truncated, os.path.join(folder, "gone-000000.tar")]
