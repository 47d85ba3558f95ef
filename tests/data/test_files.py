"""A run's data files are checked before anything is built: each mistake is one message naming the key,
the layout expected and the fix."""

import json

import pytest

from step3vl_train.data.config import DataConfig, SourceConfig
from step3vl_train.data.files import check_source_files
from step3vl_train.usage import UsageError
from tests.data.broken_data import caption
from tests.data.test_sources import write_shard

SOURCES = [SourceConfig("caption", ["caption/*.tar"]), SourceConfig("text", ["text/*.tar"])]


def write_jsonl(path, keys) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(caption(key)) + "\n" for key in keys))
    return str(path)


def refusal(sources, root, groups=None) -> str:
    with pytest.raises(UsageError) as error:
        check_source_files("data", root, groups or {"sources": sources})
    return str(error.value)


def test_the_expected_layout_is_shown_for_a_missing_or_empty_root(tmp_path):
    message = refusal(SOURCES, str(tmp_path / "nowhere"))
    assert message.startswith(f"data.root={tmp_path / 'nowhere'} is not a directory.")
    assert f"expect {tmp_path / 'nowhere' / 'caption/*.tar'}, {tmp_path / 'nowhere' / 'text/*.tar'}" in message
    assert "python data/build_shards.py --jsonl" in message
    assert refusal(SOURCES, str(tmp_path)).startswith("data.sources.caption matches no file.")


def test_a_folder_of_jsonl_files_is_named_with_the_command_that_makes_shards(tmp_path):
    write_jsonl(tmp_path / "caption" / "part.jsonl", ["a"])
    message = refusal(SOURCES, str(tmp_path))
    assert f"{tmp_path} holds JSONL files ({tmp_path / 'caption' / 'part.jsonl'})" in message
    assert "make shards of each with `python data/build_shards.py --jsonl FILE.jsonl --out DIR`" in message


def test_a_jsonl_file_where_shards_are_expected_is_refused_and_data_train_reads_it(tmp_path):
    lines = write_jsonl(tmp_path / "mine.json", ["a", "b"])  # JSONL under another suffix, given as shards
    message = refusal([SourceConfig("train", [lines])], None)
    assert message.startswith(f"data.sources.train: {lines} is a JSONL file, not a webdataset shard")
    assert "data.train=FILE.jsonl" in message
    renamed = write_jsonl(tmp_path / "mine.jsonl", ["a", "b"])
    (source,) = DataConfig(train=renamed).sources
    assert source.kind == "jsonl"
    check_source_files("data", None, {"sources": [source]})


def test_eval_sources_are_checked_under_their_own_key_and_good_shards_pass(tmp_path):
    write_shard((tmp_path / "caption").mkdir() or tmp_path / "caption" / "s-0.tar", ["k"])
    write_shard((tmp_path / "text").mkdir() or tmp_path / "text" / "s-0.tar", ["k"])
    check_source_files("data", str(tmp_path), {"sources": SOURCES})
    (tmp_path / "caption" / "s-1.tar").write_bytes(b"not a tar at all" * 40)
    groups = {"sources": SOURCES[1:], "eval": SOURCES[:1]}
    assert refusal(None, str(tmp_path), groups).startswith(
        f"data.eval.caption: {tmp_path / 'caption' / 's-1.tar'} is not a tar file"
    )


def test_a_root_no_source_reads_under_need_not_exist(tmp_path):
    shard = write_shard(tmp_path / "s-0.tar", ["k"])
    check_source_files("data", str(tmp_path / "nowhere"), {"sources": [SourceConfig("train", [shard])]})
