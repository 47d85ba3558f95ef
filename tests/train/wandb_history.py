"""What an offline W&B run directory (`<run>/wandb/offline-run-*-<id>`) holds: its history rows and how it
was started, read from its `.wandb` file: a LevelDB-style log of wandb's own `wandb_internal_pb2.Record`s
(wandb 0.31 ships no Python reader for it; its writer, in wandb-core, is `core/internal/stream/store.go`).

The writer fills a 32 KiB block before it writes, so a run killed without `finish()` leaves a file that may
hold none of its rows."""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from pathlib import Path

from wandb.proto import wandb_internal_pb2

BLOCK = 32 * 1024  # chunks never straddle a block; a tail shorter than a chunk header is padding
CHUNK_HEADER = struct.Struct("<IHB")  # checksum, length, kind
FILE_HEADER = 7  # b":W&B", magic 0xBEE1, version 0
WHOLE, LAST = 1, 4  # the kinds that end a record; FIRST (2) and MIDDLE (3) continue it


def current_offline_run(run_dir: Path) -> Path:
    """The offline run directory that a training run directory logs to now (its `wandb.json`)."""
    run_id = json.loads((Path(run_dir) / "wandb.json").read_text())["run_id"]
    (found,) = (Path(run_dir) / "wandb").glob(f"offline-run-*-{run_id}")
    return found


def records(offline_run: Path) -> Iterator[wandb_internal_pb2.Record]:
    """Every whole record, in order; a record cut short by a killed writer ends the file."""
    (path,) = Path(offline_run).glob("run-*.wandb")
    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a .wandb file"
    position, pending = FILE_HEADER, b""
    while position + CHUNK_HEADER.size <= len(data):
        if BLOCK - position % BLOCK < CHUNK_HEADER.size:
            position += BLOCK - position % BLOCK
            continue
        _, length, kind = CHUNK_HEADER.unpack_from(data, position)
        position += CHUNK_HEADER.size
        if position + length > len(data):
            return
        pending += data[position : position + length]
        position += length
        if kind in (WHOLE, LAST):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


def history(offline_run: Path) -> list[dict]:
    """The history rows as logged, each {key: value} plus W&B's own `_step`, `_runtime` and `_timestamp`; a
    logged media object (a table, an image) is W&B's dict that points to its file."""
    rows = []
    for record in records(offline_run):
        if record.HasField("history"):
            row: dict = {}
            for item in record.history.item:
                *parents, key = [item.key] if item.key else item.nested_key
                node = row
                for parent in parents:
                    node = node.setdefault(parent, {})
                node[key] = json.loads(item.value_json)
            rows.append(row)
    return rows


def logged_steps(offline_run: Path) -> list[int]:
    """The `_step` of each history row, in the order they were logged."""
    return [row["_step"] for row in history(offline_run)]


def run_group(offline_run: Path) -> str:
    return _run_record(offline_run).run_group


def run_config(offline_run: Path) -> dict:
    """The config the run started with (W&B's own `_wandb` entry left out)."""
    updates = _run_record(offline_run).config.update
    return {item.key: json.loads(item.value_json) for item in updates if item.key != "_wandb"}


def _run_record(offline_run: Path) -> wandb_internal_pb2.RunRecord:
    return next(record.run for record in records(offline_run) if record.HasField("run"))
