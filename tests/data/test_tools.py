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
        18,
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
    assert set(summary) == {"math", "geometry", "counting", "grounding", "pointing", "choice"}
    assert sum(task["samples"] for task in summary.values()) == 18
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
    (tmp_path / "in.jsonl").write_text("\n".join(map(json.dumps, lines)) + "\n\n{oops\n")  # after a blank line
    out = tmp_path / "shards"
    done = tool(
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
    summary = last_json(done)
    assert summary["samples"] == 5 and summary["shards"] == 3
    assert summary["skipped"] == {"missing_image": 1, "malformed_json": 1}
    # Lines as an editor numbers them: the third, and the eighth (a blank line before it).
    assert "in.jsonl:3 (missing_image" in done.stderr and "in.jsonl:8 (malformed_json" in done.stderr
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


def test_inspect_data_reports_shares_beside_targets_and_repeated_skips(tmp_path):
    paths = write_held_out(str(tmp_path))
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps({"text": f"document {i}"}) + "\n" for i in range(4)))
    config = {
        "sources": [
            {"name": "held_out", "paths": paths, "weight": 3},
            {"name": "docs", "kind": "jsonl", "paths": [str(tmp_path / "docs.jsonl")], "weight": 1},
        ]
    }
    (tmp_path / "data.yaml").write_text(json.dumps(config))
    processor = REPO / "configs/processor/tiny.yaml"
    done = tool("inspect_data.py", tmp_path / "data.yaml", "--processor", processor, "--seq-len", 2048, "--epochs", 3)
    report = last_json(done)
    assert report["samples"] == 3 * (GOOD + TRUNCATED_GOOD + 4)
    assert {k.removeprefix("skipped/"): v for k, v in report.items() if k.startswith("skipped/")} == {
        reason: 3 * n for reason, n in EXPECTED_SKIPS.items()
    }
    assert {k.removeprefix("skipped_unique/"): v for k, v in report.items() if k.startswith("skipped_unique/")} == (
        EXPECTED_SKIPS
    )
    assert (report["target/held_out"], report["target/docs"]) == (0.75, 0.25)
    for name, target in (("held_out", "0.7500"), ("docs", "0.2500")):
        assert f"source {name}: {report[f'share/{name}']:.4f} of tokens (target {target})" in done.stdout
    assert "skipped 2 distinct, met 6 times (corrupt_image)" in done.stdout
    for field in ("samples_per_s", "tokens_per_s", "images_per_s", "packing_efficiency"):
        assert field in report
    # Each bad key is logged once, with its reason and source, though every pass meets it.
    assert done.stderr.count("held-out-000000.tar:cut-image (corrupt_image, source held_out)") == 1
