"""Exact resume of the data loader across processes: 2 ranks x 2 workers, stopped mid-window."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).with_name("loader_run.py")
BATCHES = 12


def run(root, rank, out, batches, *extra):
    subprocess.run(
        [sys.executable, str(SCRIPT), str(root), str(rank), "2", str(batches), str(out), *extra],
        check=True,
        timeout=300,
    )
    return json.loads(Path(out).read_text())


@pytest.mark.slow
@pytest.mark.parametrize("rank", [0, 1])
def test_resumed_batches_equal_uninterrupted_ones(pretrain_corpus, tmp_path, rank):
    straight = run(pretrain_corpus, rank, tmp_path / "straight.json", BATCHES)
    state = tmp_path / "loader.pt"
    first = run(pretrain_corpus, rank, tmp_path / "first.json", BATCHES // 2, "--save", str(state))
    second = run(pretrain_corpus, rank, tmp_path / "second.json", BATCHES // 2, "--load", str(state))
    assert len(straight["digests"]) == BATCHES
    assert first["digests"] + second["digests"] == straight["digests"]
    assert second["stats"] == straight["stats"]  # counts carry over too: nothing counted twice
    # Windows of 12 packs: the stop lands inside a window, after more than one epoch of some source.
    assert straight["stats"]["samples"] > 24
