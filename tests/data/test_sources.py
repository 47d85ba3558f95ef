import json
import os

import pytest
from webdataset import TarWriter

from step3vl_train.data.config import SourceConfig
from step3vl_train.data.schema import Sample
from step3vl_train.data.skips import SkippedSample
from step3vl_train.data.sources import (
    SourceCursor,
    SourceReader,
    read_jsonl_shard,
    read_tar_shard,
    resolve_shards,
)
from tests.data.broken_data import caption, png


def write_shard(path, keys):
    with TarWriter(str(path)) as writer:
        for key in keys:
            writer.write({"__key__": key, "json": json.dumps(caption(key)).encode(), "0.png": png()})
    return str(path)


def keys_of(items):
    return [item.key.rsplit(":", 1)[1] for item in items]


def test_resolve_shards_braces_globs_and_root(tmp_path):
    for i in range(3):
        write_shard(tmp_path / f"s-{i:02d}.tar", [f"k{i}"])
    by_brace = resolve_shards(SourceConfig("a", ["s-{00..02}.tar"]), str(tmp_path))
    by_glob = resolve_shards(SourceConfig("a", [str(tmp_path / "s-*.tar")]), None)
    assert by_brace == by_glob == [str(tmp_path / f"s-{i:02d}.tar") for i in range(3)]
    assert resolve_shards(SourceConfig("a", ["pipe:cat x.tar"]), str(tmp_path)) == ["pipe:cat x.tar"]
    with pytest.raises(FileNotFoundError, match="matches no file"):
        resolve_shards(SourceConfig("a", ["nothing-*.tar"]), str(tmp_path))


def test_tar_resume_by_offset_and_by_stream(tmp_path):
    path = write_shard(tmp_path / "s.tar", [f"k{i}" for i in range(6)])
    whole = list(read_tar_shard(path))
    assert keys_of(item for item, _, _ in whole) == [f"k{i}" for i in range(6)]
    assert [index for _, index, _ in whole] == list(range(6))
    _, index, offset = whole[2]
    resumed = list(read_tar_shard(path, index + 1, offset))
    assert keys_of(item for item, _, _ in resumed) == ["k3", "k4", "k5"]
    streamed = list(read_tar_shard(f"pipe:cat {path}", index + 1, None))  # no seek: re-reads, drops 3
    assert keys_of(item for item, _, _ in streamed) == ["k3", "k4", "k5"]
    assert all(offset is None for _, _, offset in streamed)


def test_truncated_and_missing_shards_are_reported(tmp_path):
    from tests.data.broken_data import TRUNCATED_GOOD, write_held_out

    _, truncated, gone = write_held_out(str(tmp_path))
    items = [item for item, _, _ in read_tar_shard(truncated)]
    assert [isinstance(item, Sample) for item in items] == [True] * TRUNCATED_GOOD + [False]
    assert items[-1].reason == "unreadable_shard" and "stops after 2 samples" in items[-1].detail
    (missing,) = [item for item, _, _ in read_tar_shard(gone)]
    assert missing.reason == "unreadable_shard"


def test_jsonl_with_image_folder(tmp_path):
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "a.png").write_bytes(png())
    lines = [
        json.dumps(caption("first") | {"images": ["a.png"], "key": "one"}),
        "",
        "{broken",
        json.dumps(caption("second") | {"images": ["nope.png"]}),
        json.dumps({"text": "third"}),
    ]
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(lines) + "\n")
    items = list(read_jsonl_shard(str(path), str(tmp_path / "img")))
    assert isinstance(items[0][0], Sample) and items[0][0].key.endswith(":one")
    assert items[0][0].images == [png()]
    assert [item.reason for item, _, _ in items[1:3]] == ["malformed_json", "missing_image"]
    assert isinstance(items[3][0], Sample) and items[3][0].text == "third"
    # Keys without a `key` field name the line as an editor numbers it: from 1, the blank line counted.
    assert [item.key.rsplit(":", 1)[1] for item, _, _ in items] == ["one", "3", "4", "5"]
    _, index, offset = items[1]
    resumed = list(read_jsonl_shard(str(path), str(tmp_path / "img"), index + 1, offset))
    assert [(i, item.key.rsplit(":", 1)[1]) for item, i, _ in resumed] == [(2, "4"), (3, "5")]


def test_a_keyed_jsonl_sample_that_fails_names_its_line(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text("\n" + json.dumps(caption("gone") | {"images": ["nope.png"], "key": "k"}) + "\n")
    ((skip, _, _),) = read_jsonl_shard(str(path), str(tmp_path))
    assert skip.key.endswith(":k") and skip.reason == "missing_image" and skip.detail.startswith("line 2: ")


def test_hf_dataset_source(tmp_path):
    datasets = pytest.importorskip("datasets")
    image_path = tmp_path / "a.png"
    image_path.write_bytes(png())
    rows = {
        "text": [[{"type": "image", "text": None}, {"type": "text", "text": "red"}], None],
        "messages": [None, json.dumps([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}])],
        "images": [[str(image_path)], []],
    }
    features = datasets.Features(
        {
            "text": datasets.List({"type": datasets.Value("string"), "text": datasets.Value("string")}),
            "messages": datasets.Value("string"),
            "images": datasets.List(datasets.Image()),
        }
    )
    datasets.Dataset.from_dict(rows, features=features).save_to_disk(str(tmp_path / "ds"))
    reader = SourceReader(SourceConfig("hf", [str(tmp_path / "ds")], kind="hf"), [str(tmp_path / "ds")], 0, 1, 0, 1)
    items = [reader.next(), reader.next()]
    assert reader.next() is None
    by_kind = {("text" if item.text else "chat"): item for item in items}
    assert by_kind["text"].images == [png()] and by_kind["text"].text[1]["text"] == "red"
    assert by_kind["chat"].messages[1]["content"] == "yo"


def read_all(reader):
    keys = []
    while (item := reader.next()) is not None:
        keys.append(item.key.rsplit(":", 1)[1] if not isinstance(item, SkippedSample) else item.reason)
    return keys


@pytest.mark.parametrize("num_shards", [2, 8])  # fewer shards than readers: samples are strided
def test_readers_split_an_epoch_disjointly(tmp_path, num_shards):
    shards = [write_shard(tmp_path / f"s{i}.tar", [f"s{i}k{j}" for j in range(5)]) for i in range(num_shards)]
    source = SourceConfig("a", shards)
    parts = [read_all(SourceReader(source, shards, r, 4, seed=1, max_epochs=1)) for r in range(4)]
    everything = [key for part in parts for key in part]
    assert sorted(everything) == sorted(f"s{i}k{j}" for i in range(num_shards) for j in range(5))
    assert all(parts)


def test_cursor_restores_mid_shard_and_across_epochs(tmp_path):
    shards = [write_shard(tmp_path / f"s{i}.tar", [f"s{i}k{j}" for j in range(3)]) for i in range(3)]
    source = SourceConfig("a", shards)
    straight = SourceReader(source, shards, 0, 1, seed=3, max_epochs=2)
    expected = read_all(straight)
    assert len(expected) == 18 and expected[:9] != expected[9:]  # shards reshuffled each epoch
    for stop in (1, 3, 4, 9, 13):
        first = SourceReader(source, shards, 0, 1, seed=3, max_epochs=2)
        head = [first.next().key.rsplit(":", 1)[1] for _ in range(stop)]
        second = SourceReader(source, shards, 0, 1, seed=3, max_epochs=2)
        second.restore(SourceCursor(**vars(first.cursor)))
        assert head + read_all(second) == expected


def test_last_sample_of_a_shard_moves_the_cursor_on(tmp_path):
    shards = [write_shard(tmp_path / f"s{i}.tar", [f"s{i}k{j}" for j in range(2)]) for i in range(2)]
    reader = SourceReader(SourceConfig("a", shards), shards, 0, 1, seed=0, max_epochs=None)
    reader.next()
    reader.next()
    assert (reader.cursor.shard, reader.cursor.index) == (1, 0)
    assert os.path.exists(shards[0])


def test_a_reader_with_no_share_of_a_tiny_source_stops(tmp_path):
    shards = [write_shard(tmp_path / "s.tar", ["only"])]
    source = SourceConfig("a", shards)
    assert read_all(SourceReader(source, shards, 1, 2, seed=0, max_epochs=None)) == []
    reader = SourceReader(source, shards, 0, 2, seed=0, max_epochs=None)
    assert [reader.next().key.endswith(":only") for _ in range(3)] == [True] * 3  # repeats, epoch after epoch


def test_http_shards_on_loopback(tmp_path):
    import functools
    import http.server
    import shutil
    import threading

    if shutil.which("curl") is None:
        pytest.skip("webdataset reads http through curl, which is not installed")
    write_shard(tmp_path / "remote.tar", ["r0", "r1", "r2"])
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/remote.tar"
        assert keys_of(item for item, _, _ in read_tar_shard(url)) == ["r0", "r1", "r2"]
        assert keys_of(item for item, _, _ in read_tar_shard(url, 2)) == ["r2"]
        (missing,) = [item for item, _, _ in read_tar_shard(url.replace("remote", "absent"))]
        assert missing.reason == "unreadable_shard"
    finally:
        server.shutdown()
