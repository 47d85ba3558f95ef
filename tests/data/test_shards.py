import json

from step3vl_train.data.shards import ShardSetWriter
from step3vl_train.data.sources import read_tar_shard


def test_rolls_by_samples_and_bytes_and_writes_a_manifest(tmp_path):
    writer = ShardSetWriter(str(tmp_path), max_samples=3, max_bytes=2500)
    for i in range(7):
        writer.write(f"k{i}", {"text": f"doc {i}"}, [], [], tokens=10)
    big = ShardSetWriter(str(tmp_path / "big"), max_samples=100, max_bytes=2500)
    for i in range(4):
        big.write(f"b{i}", {"text": "x" * 1000}, [], [])
    manifest = writer.close()
    assert [s["samples"] for s in manifest["shards"]] == [3, 3, 1]
    assert manifest["samples"] == 7 and manifest["tokens"] == 70
    assert json.loads((tmp_path / "manifest.json").read_text()) == manifest
    assert not list(tmp_path.glob("*.tmp"))
    keys = [
        item.key.rsplit(":", 1)[1]
        for s in manifest["shards"]
        for item, _, _ in read_tar_shard(str(tmp_path / s["path"]))
    ]
    assert keys == [f"k{i}" for i in range(7)]
    big_manifest = big.close()
    assert [s["samples"] for s in big_manifest["shards"]] == [3, 1] and "tokens" not in big_manifest


def test_an_open_shard_has_no_final_name(tmp_path):
    writer = ShardSetWriter(str(tmp_path), max_samples=10)
    writer.write("k0", {"text": "doc"}, [], [])
    assert [p.name for p in tmp_path.iterdir()] == ["shard-000000.tar.tmp"]
    writer.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["manifest.json", "shard-000000.tar"]
