"""Where samples come from: webdataset shards, JSONL files with an image folder, saved HF datasets.

Each (rank, DataLoader worker) pair reads its own part of every source. A source is a list of shards
(tar files, JSONL files, or the one HF dataset); with at least as many shards as readers, each reader
takes whole shards, otherwise every reader walks all shards and keeps every n-th sample. A reader's
position is a `SourceCursor`, which is all it needs to carry on exactly where it stopped.
"""

from __future__ import annotations

import glob
import json
import os
import re
import tarfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
from braceexpand import braceexpand

from step3vl_train.data.config import SourceConfig
from step3vl_train.data.schema import Sample, build_sample, decode_record
from step3vl_train.data.skips import SkippedSample

# webdataset's naming: "dir/KEY.json", "dir/KEY.0.jpg"; the key runs to the first dot of the basename.
MEMBER_NAME = re.compile(r"^((?:.*/|)[^./]+)\.([^/]*)$")
IMAGE_SUFFIX = re.compile(r"^(\d+)\.(jpg|jpeg|png|webp|bmp|gif|tif|tiff)$", re.IGNORECASE)


@dataclass
class SourceCursor:
    epoch: int = 0
    shard: int = 0  # position in this reader's shard order for the epoch
    index: int = 0  # samples read from that shard (all of them, when samples are strided)
    offset: int | None = None  # byte offset of the next sample, where the shard is a seekable file


def is_local(url: str) -> bool:
    return not url.startswith("pipe:") and "://" not in url


def resolve_shards(source: SourceConfig, root: str | None) -> list[str]:
    """The source's shards in a fixed order: brace ranges expanded, local globs matched and sorted."""
    shards: list[str] = []
    for pattern in source.paths:
        for url in braceexpand(pattern):
            if is_local(url) and root and not os.path.isabs(url):
                url = os.path.join(root, url)
            if is_local(url) and glob.has_magic(url):
                matched = sorted(glob.glob(url))
                if not matched:
                    raise FileNotFoundError(f"data.sources.{source.name}: {url!r} matches no file")
                shards += matched
            else:
                shards.append(url)
    if source.kind == "hf" and len(shards) != 1:
        raise ValueError(f"data.sources.{source.name}: an hf source takes one dataset directory, got {shards}")
    return shards


class SourceReader:
    """One reader's stream of one source: samples or `SkippedSample`s, epoch after epoch."""

    def __init__(
        self,
        source: SourceConfig,
        shards: list[str],
        reader: int,
        num_readers: int,
        seed: int,
        max_epochs: int | None,
    ):
        self.source = source
        self.shards = shards
        self.reader = reader
        self.num_readers = num_readers
        self.seed = seed
        self.max_epochs = max_epochs
        self.cursor = SourceCursor()
        self._stream: Iterator[tuple[Sample | SkippedSample, SourceCursor]] | None = None
        self._hf_rows = None

    def restore(self, cursor: SourceCursor) -> None:
        self.cursor = cursor
        self._stream = None

    def next(self) -> Sample | SkippedSample | None:
        """The next sample or skip; None once `max_epochs` passes are done."""
        if self._stream is None:
            self._stream = self._read(self.cursor)
        item = next(self._stream, None)
        if item is None:
            return None
        item, self.cursor = item
        return item

    def shard_order(self, epoch: int) -> tuple[list[str], int, int]:
        """This reader's shards for `epoch`, and the (stride, phase) of the samples it keeps in each."""
        rng = np.random.default_rng([self.seed, epoch, _stable_hash(self.source.name)])
        shuffled = [self.shards[i] for i in rng.permutation(len(self.shards))]
        if len(shuffled) >= self.num_readers:
            return shuffled[self.reader :: self.num_readers], 1, 0
        return shuffled, self.num_readers, self.reader

    def _read(self, start: SourceCursor) -> Iterator[tuple[Sample | SkippedSample, SourceCursor]]:
        epoch = start.epoch
        while self.max_epochs is None or epoch < self.max_epochs:
            shards, stride, phase = self.shard_order(epoch)
            first = start.shard if epoch == start.epoch else 0
            produced = first > 0 or start.index > 0  # a resumed epoch has produced before
            for position in range(first, len(shards)):
                resume = start if (epoch, position) == (start.epoch, start.shard) else SourceCursor(epoch, position)
                kept = (
                    (item, SourceCursor(epoch, position, index + 1, offset))
                    for item, index, offset in self._read_shard(
                        shards[position], epoch, resume.index, resume.offset, stride, phase
                    )
                )
                # The shard's last sample points the cursor at the next shard, so a resume does not reopen it.
                pending = next(kept, None)
                for following in kept:
                    yield pending
                    pending = following
                if pending is not None:
                    produced = True
                    yield pending[0], SourceCursor(epoch, position + 1)
            if not produced:  # fewer samples than readers: this one gets none, in any epoch
                return
            epoch += 1
            start = SourceCursor(epoch)

    def _read_shard(
        self, url: str, epoch: int, index: int, offset: int | None, stride: int, phase: int
    ) -> Iterator[tuple[Sample | SkippedSample, int, int | None]]:
        """Yields (sample or skip, its index in the shard, byte offset just past it) from sample `index` on,
        for the indices this reader keeps (index % stride == phase)."""
        kind = self.source.kind
        if kind == "webdataset":
            yield from read_tar_shard(url, index, offset, stride, phase)
        elif kind == "jsonl":
            yield from read_jsonl_shard(url, self.source.image_dir, index, offset, stride, phase)
        else:
            yield from self._read_hf(url, epoch, index, stride, phase)

    def _read_hf(
        self, path: str, epoch: int, index: int, stride: int, phase: int
    ) -> Iterator[tuple[Sample | SkippedSample, int, None]]:
        if self._hf_rows is None:
            self._hf_rows = load_hf_rows(path, self.source.split)
        rows = self._hf_rows
        order = np.random.default_rng([self.seed, epoch, _stable_hash(self.source.name)]).permutation(len(rows))
        first = index + (phase - index) % stride  # rows are random access: go straight to this reader's
        for i in range(first, len(rows), stride):
            row = int(order[i])
            yield hf_row_to_sample(f"{self.source.name}/{row}", rows[row]), i, None


def read_tar_shard(
    url: str, index: int = 0, offset: int | None = None, stride: int = 1, phase: int = 0
) -> Iterator[tuple[Sample | SkippedSample, int, int | None]]:
    """Samples of one webdataset tar: members grouped by key; only those whose index % stride == phase
    are decoded and yielded. A local file resumes by seeking to `offset`; a stream (pipe:, http) re-reads
    and drops the first `index` samples without decoding them."""
    seekable = is_local(url)
    base = offset if seekable and offset is not None else 0
    position = index if seekable and offset is not None else 0
    failure = None
    try:
        # A stream reports a failed command or download when it is closed, so closing is inside the try.
        with open(url, "rb") if seekable else _open_url(url) as stream:  # noqa: SIM115
            if base:
                stream.seek(base)
            key, members = None, {}
            with tarfile.open(fileobj=stream, mode="r|") as tar:
                for member in tar:
                    match = MEMBER_NAME.match(member.name) if member.isfile() else None
                    if match is None:
                        continue
                    member_key, suffix = match.groups()
                    if member_key != key and key is not None:
                        if position >= index and position % stride == phase:
                            next_offset = base + member.offset if seekable else None
                            yield _tar_sample(url, key, members), position, next_offset
                        position += 1
                        members = {}
                    key = member_key
                    members[suffix] = tar.extractfile(member).read()
            if key is not None and position >= index and position % stride == phase:
                yield _tar_sample(url, key, members), position, None
    except (tarfile.TarError, OSError, EOFError) as err:
        failure = err
    if failure is not None and position % stride == phase:  # one reader of a strided shard reports it
        yield SkippedSample("unreadable_shard", url, f"stops after {position} samples: {failure}"), position, None


def _tar_sample(url: str, key: str, members: dict[str, bytes]) -> Sample | SkippedSample:
    label = f"{url}:{key}"
    try:
        if "json" not in members:
            raise SkippedSample("bad_schema", label, "no .json member")
        images = {}
        for suffix, data in members.items():
            match = IMAGE_SUFFIX.match(suffix)
            if match:
                images[int(match.group(1))] = data
        return build_sample(label, decode_record(label, members["json"]), images)
    except SkippedSample as skip:
        return skip


def read_jsonl_shard(
    path: str, image_dir: str | None, index: int = 0, offset: int | None = None, stride: int = 1, phase: int = 0
) -> Iterator[tuple[Sample | SkippedSample, int, int | None]]:
    """One sample a non-empty line, keyed `path:LINE` (1-based, blank lines counted, as an editor shows
    it) unless it has a `key`; its `images` field lists files under `image_dir` (default: the file's
    folder). Only lines whose sample index % stride == phase are parsed. Resumes by seeking to `offset`
    (and counting the line breaks before it, for the line numbers)."""
    folder = image_dir or os.path.dirname(path)
    try:
        handle = open(path, "rb")  # noqa: SIM115
    except OSError as err:
        if index % stride == phase:  # one reader of a strided file reports it
            yield SkippedSample("unreadable_shard", path, str(err)), index, offset
        return
    with handle:
        position = index if offset is not None else 0
        line_number = _line_breaks(handle, offset) if offset else 0
        handle.seek(offset or 0)
        for line in iter(handle.readline, b""):
            line_number += 1
            if not line.strip():
                continue
            if position >= index and position % stride == phase:
                yield _jsonl_sample(path, line_number, line, folder), position, handle.tell()
            position += 1


def _line_breaks(handle, end: int) -> int:
    handle.seek(0)
    count, left = 0, end
    while left > 0:
        chunk = handle.read(min(left, 1 << 20))
        if not chunk:
            break
        count += chunk.count(b"\n")
        left -= len(chunk)
    return count


def record_key(label: str) -> str:
    """A sample's own key, from its label (`SHARD:KEY`, `FILE:KEY` or `FILE:LINE`): the same wherever its
    shards are read from, so what is seeded by it (PaCoRe's draws) does not move with them."""
    return label.rsplit(":", 1)[-1]


def _jsonl_sample(path: str, line_number: int, line: bytes, folder: str) -> Sample | SkippedSample:
    at_line = f"{path}:{line_number}"
    label = at_line
    try:
        record = decode_record(label, line)
        label = f"{path}:{record['key']}" if isinstance(record.get("key"), str) else label
        names = record.get("images") or []
        if not isinstance(names, list) or not all(isinstance(name, str) for name in names):
            raise SkippedSample("bad_schema", label, "'images' must be a list of file names")
        images = {}
        for i, name in enumerate(names):
            try:
                with open(os.path.join(folder, name), "rb") as image:
                    images[i] = image.read()
            except OSError:
                pass  # reported as missing_image, with the others, by build_sample
        return build_sample(label, record, images)
    except SkippedSample as skip:
        if label == at_line:
            return skip
        return SkippedSample(skip.reason, skip.key, f"line {line_number}: {skip.detail}")


def load_hf_rows(path: str, split: str):
    """A dataset saved with `save_to_disk`, images left undecoded (bytes)."""
    import datasets

    loaded = datasets.load_from_disk(path)
    rows = loaded[split] if isinstance(loaded, datasets.DatasetDict) else loaded
    if "images" in rows.column_names:
        feature = rows.features["images"]
        inner = getattr(feature, "feature", None)
        if isinstance(inner, datasets.Image):
            rows = rows.cast_column("images", datasets.List(datasets.Image(decode=False)))
    return rows


def hf_row_to_sample(key: str, row: dict) -> Sample | SkippedSample:
    """Rows hold the schema's fields (`messages` may be a JSON string) and `images`: image features
    ({"bytes", "path"}) or raw bytes."""
    try:
        record = {name: value for name, value in row.items() if value is not None and name != "images"}
        if isinstance(record.get("messages"), str):
            try:
                record["messages"] = json.loads(record["messages"])
            except json.JSONDecodeError as err:
                raise SkippedSample("malformed_json", key, f"messages: {err}") from err
        record = _drop_arrow_nulls(record)
        images = {}
        for i, image in enumerate(row.get("images") or []):
            data = image.get("bytes") if isinstance(image, dict) else image
            if data is None and isinstance(image, dict) and image.get("path"):
                with open(image["path"], "rb") as handle:
                    data = handle.read()
            if data is not None:
                images[i] = data
        return build_sample(key, record, images)
    except SkippedSample as skip:
        return skip


def _drop_arrow_nulls(value):
    """Arrow gives every struct all fields, absent ones as None: `{"type": "image", "text": None}`."""
    if isinstance(value, dict):
        return {k: _drop_arrow_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_drop_arrow_nulls(v) for v in value]
    return value


def _open_url(url: str):
    from webdataset import gopen  # pipe:, http(s):// (through curl), and the other schemes it knows

    return gopen(url, "rb")


def _stable_hash(text: str) -> int:
    return zlib.crc32(text.encode())
