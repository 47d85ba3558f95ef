"""A run's data files checked before anything is built: each source's files exist and are what its kind
reads. A mistake is one UsageError naming the key, what was found, the layout expected and the fix."""

from __future__ import annotations

import glob
import os

from step3vl_train.data.config import SourceConfig
from step3vl_train.data.sources import is_local, resolve_shards
from step3vl_train.usage import UsageError

BUILD_SHARDS = "python data/build_shards.py --jsonl FILE.jsonl --out DIR"
TAR_MAGIC_OFFSET, TAR_MAGIC = 257, b"ustar"
JSONL_SUFFIXES = (".jsonl", ".json")


def check_source_files(key: str, root: str | None, groups: dict[str, list[SourceConfig]]) -> None:
    """`key` is the config section (`data`, `prompts`), `root` its `root`, `groups` its lists of sources
    by name (`sources`, `eval`)."""
    everything = [source for sources in groups.values() for source in sources]
    under_root = any(is_local(path) and not os.path.isabs(path) for source in everything for path in source.paths)
    if root and under_root and not os.path.isdir(root):
        raise UsageError(f"{key}.root={root} is not a directory. {expected_layout(everything, root, key)}")
    for group, sources in groups.items():
        for source in sources:
            name = f"{key}.{group}.{source.name}"
            try:
                shards = resolve_shards(source, root)
            except FileNotFoundError:
                raise UsageError(f"{name} matches no file. {expected_layout(everything, root, key)}") from None
            for shard in filter(is_local, shards):
                if not shard_readable(shard, source.kind):
                    raise UsageError(
                        f"{name}: {unreadable(shard, source.kind, key)} {expected_layout(everything, root, key)}"
                    )


def shard_readable(shard: str, kind: str) -> bool:
    if kind == "hf":
        return os.path.isdir(shard)
    return os.path.isfile(shard) and (kind != "webdataset" or is_tar(shard))


def unreadable(shard: str, kind: str, key: str) -> str:
    """What is wrong with a shard `shard_readable` refused, and the fix."""
    if kind == "hf":
        return f"{shard} is not a saved HF dataset directory (datasets' save_to_disk)."
    if not os.path.isfile(shard):
        return f"{shard} is not a file."
    if looks_like_jsonl(shard):
        return (
            f"{shard} is a JSONL file, not a webdataset shard: make shards of it with `{BUILD_SHARDS}` and give "
            f"their pattern (DIR/shard-*.tar), or read it as it is ({key}.train=FILE.jsonl, or kind: jsonl)."
        )
    return f"{shard} is not a tar file (a webdataset shard)."


def is_tar(path: str) -> bool:
    """A POSIX or GNU tar header at the file's start (empty files and others are not shards)."""
    with open(path, "rb") as handle:
        header = handle.read(TAR_MAGIC_OFFSET + len(TAR_MAGIC))
    return header[TAR_MAGIC_OFFSET:] == TAR_MAGIC


def looks_like_jsonl(path: str) -> bool:
    if path.endswith(JSONL_SUFFIXES):
        return True
    with open(path, "rb") as handle:
        return handle.read(64).lstrip().startswith(b"{")


def expected_layout(sources: list[SourceConfig], root: str | None, key: str) -> str:
    """The files the sources' patterns ask for, and what the folder they point at holds instead."""
    wanted = [os.path.join(root, path) if root and is_local(path) else path for s in sources for path in s.paths]
    line = f"The {key} sources expect {', '.join(wanted)}"
    folder = root if root and os.path.isdir(root) else None
    near = [os.path.join(folder, "*.jsonl"), os.path.join(folder, "*", "*.jsonl")] if folder else []
    jsonl = sorted(path for pattern in near for path in glob.glob(pattern))[:3]
    if jsonl:
        line += f"; {root} holds JSONL files ({', '.join(jsonl)}): make shards of each with `{BUILD_SHARDS}`"
    else:
        line += f" (webdataset shards: `{BUILD_SHARDS}` makes them from JSONL)"
    return line + "."
