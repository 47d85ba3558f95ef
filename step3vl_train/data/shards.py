"""Writing webdataset shards with a manifest of what each holds."""

from __future__ import annotations

import io
import json
import os
from dataclasses import asdict, dataclass, field

from PIL import Image
from webdataset import TarWriter

MANIFEST = "manifest.json"


@dataclass
class ShardInfo:
    path: str  # relative to the manifest's folder
    samples: int = 0
    tokens: int = 0
    images: int = 0
    bytes: int = 0


@dataclass
class ShardSetWriter:
    """Rolls to a new shard after `max_samples` samples or `max_bytes` bytes, whichever comes first.
    A shard is written under a temporary name and renamed once closed, so a crash leaves no half shard
    under a real name. The manifest counts tokens where `write` is given them."""

    folder: str
    prefix: str = "shard"
    max_samples: int = 1000
    max_bytes: int = 1 << 30
    shards: list[ShardInfo] = field(default_factory=list)

    def __post_init__(self) -> None:
        os.makedirs(self.folder, exist_ok=True)
        self._writer: TarWriter | None = None
        self._counted = False

    def write(
        self, key: str, record: dict, images: list[bytes], image_suffixes: list[str], tokens: int | None = None
    ) -> None:
        """One sample: `KEY.json` plus `KEY.i.<suffix>` for its images, in order."""
        current = self.shards[-1] if self.shards else None
        if self._writer is None or current.samples >= self.max_samples or current.bytes >= self.max_bytes:
            self._roll()
            current = self.shards[-1]
        entry = {"__key__": key, "json": json.dumps(record, ensure_ascii=False).encode()}
        for i, (data, suffix) in enumerate(zip(images, image_suffixes, strict=True)):
            entry[f"{i}.{suffix}"] = data
        self._writer.write(entry)
        current.samples += 1
        current.images += len(images)
        current.bytes += sum(len(v) for k, v in entry.items() if k != "__key__")
        if tokens is not None:
            current.tokens += tokens
            self._counted = True

    def close(self) -> dict:
        """Finishes the last shard and writes `manifest.json`; returns the manifest."""
        self._finish()
        totals = {name: sum(getattr(s, name) for s in self.shards) for name in ("samples", "tokens", "images", "bytes")}
        manifest = {**totals, "shards": [asdict(s) for s in self.shards]}
        if not self._counted:
            manifest.pop("tokens")
            for shard in manifest["shards"]:
                shard.pop("tokens")
        with open(os.path.join(self.folder, MANIFEST), "w") as handle:
            json.dump(manifest, handle, indent=1)
        return manifest

    def _roll(self) -> None:
        self._finish()
        name = f"{self.prefix}-{len(self.shards):06d}.tar"
        self.shards.append(ShardInfo(name))
        # A fixed mtime keeps shards byte-identical across runs with the same content.
        self._writer = TarWriter(os.path.join(self.folder, name + ".tmp"), mtime=0)

    def _finish(self) -> None:
        if self._writer is not None:
            self._writer.close()
            path = os.path.join(self.folder, self.shards[-1].path)
            os.replace(path + ".tmp", path)
            self._writer = None


def encode_image(image: Image.Image, suffix: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format={"jpg": "JPEG", "png": "PNG"}[suffix], **({"quality": 90} if suffix == "jpg" else {}))
    return buffer.getvalue()
