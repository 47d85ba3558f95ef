"""The data tools users run: make_synthetic.py, build_shards.py, inspect_data.py."""

import hashlib
import json
import subprocess
import sys

import pytest

from step3vl_train.data.sources import read_tar_shard
from tests.conftest import REPO
from tests.data.broken_data import EXPECTED_SKIPS, GOOD, TRUNCATED_GOOD, caption, png, write_held_out


def tool(name, *args):
    done = subprocess.run(
        [sys.executable, str(REPO / "data" / name), *map(str, args)], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    return done


def last_json(done):
    return json.loads(done.stdout.strip().splitlines()[-1])


def digest(folder):
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.rglob("*.tar")}


def test_make_synthetic_is_deterministic_and_counts(tmp_path):
    args = [
        "--kind",
        "rl",
        "--num",
        15,
        "--seed",
        7,
        "--shard-size",
        2,
        "--processor",
        REPO / "configs/processor/tiny.yaml",
    ]
    summary = last_json(tool("make_synthetic.py", *args, "--out", tmp_path / "a"))
    tool("make_synthetic.py", *args, "--out", tmp_path / "b")
    assert digest(tmp_path / "a") == digest(tmp_path / "b") != {}
    assert set(summary) == {"math", "geometry", "counting", "grounding", "pointing"}
    assert sum(task["samples"] for task in summary.values()) == 15
    manifest = json.loads((tmp_path / "a" / "grounding" / "manifest.json").read_text())
    assert [s["samples"] for s in manifest["shards"]] == [2, 1]
    assert sum(s["tokens"] for s in manifest["shards"]) == manifest["tokens"] > 0
    samples = [
        item
        for path in sorted((tmp_path / "a" / "grounding").glob("*.tar"))
        for item, _, _ in read_tar_shard(str(path))
    ]
    assert all(s.reward == "grounding" and len(s.boxes) == 1 and len(s.answer) == 4 for s in samples)


def test_build_shards_from_jsonl_skips_bad_lines(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "a.png").write_bytes(png())
    lines = [caption(f"sample {i}") | {"images": ["a.png"], "key": f"s{i}"} for i in range(5)]
    lines.insert(2, caption("gone") | {"images": ["missing.png"]})
    (tmp_path / "in.jsonl").write_text("\n".join(map(json.dumps, lines)) + "\n{oops\n")
    out = tmp_path / "shards"
    summary = last_json(
        tool(
            "build_shards.py",
            "--jsonl",
            tmp_path / "in.jsonl",
            "--image-dir",
            tmp_path / "images",
            "--out",
            out,
            "--max-samples",
            2,
        )
    )
    assert summary["samples"] == 5 and summary["shards"] == 3
    assert summary["skipped"] == {"missing_image": 1, "malformed_json": 1}
    keys = [
        item.key.rsplit(":", 1)[1] for path in sorted(out.glob("*.tar")) for item, _, _ in read_tar_shard(str(path))
    ]
    assert keys == [f"s{i}" for i in range(5)]
    assert summary["tokens"] == json.loads((out / "manifest.json").read_text())["tokens"] > 0


def test_build_shards_from_a_saved_hf_dataset(tmp_path):
    datasets = pytest.importorskip("datasets")
    (tmp_path / "a.png").write_bytes(png())
    rows = {"text": ["plain words", "more words"], "images": [[], []]}
    features = datasets.Features({"text": datasets.Value("string"), "images": datasets.List(datasets.Image())})
    datasets.Dataset.from_dict(rows, features=features).save_to_disk(str(tmp_path / "ds"))
    summary = last_json(tool("build_shards.py", "--hf", tmp_path / "ds", "--out", tmp_path / "shards"))
    assert summary["samples"] == 2 and summary["skipped"] == {}


def test_inspect_data_reports_held_out_skips(tmp_path):
    paths = write_held_out(str(tmp_path))
    done = tool("inspect_data.py", *paths, "--processor", REPO / "configs/processor/tiny.yaml", "--seq-len", 2048)
    report = last_json(done)
    assert report["samples"] == GOOD + TRUNCATED_GOOD
    assert {k.removeprefix("skipped/"): v for k, v in report.items() if k.startswith("skipped/")} == EXPECTED_SKIPS
    for field in ("samples_per_s", "tokens_per_s", "images_per_s", "packing_efficiency", "share/shards"):
        assert field in report
    assert "held-out-000000.tar:cut-image (corrupt_image)" in done.stderr  # the key is in the log
