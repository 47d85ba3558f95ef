"""Checkpoints that survive every crash: faults injected at each named point of a save and of pruning,
then a fresh Checkpointer on the same directory resumes from a complete checkpoint and goes on cleanly.

Run as a script (`python tests/train/test_checkpoint.py RUN_DIR POINT`), it saves steps 1 to 3 and
SIGKILLs itself at POINT of the third save."""

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from step3vl_train.train.checkpoint import Checkpointer
from step3vl_train.train.distributed import close_distributed

REPO = Path(__file__).resolve().parents[2]
SAVE_POINTS = ["begun", "engine_saved", "written", "renamed", "published", "pruning"]
PUBLISHED_AT = {"published", "pruning"}  # a crash here comes after `latest` names the new checkpoint
CHECKPOINT_FILES = {"model_states.pt", "optim_states.pt", "trainer_rank0.pt", "config.yaml"}


class FakeEngine:
    """What the checkpointer asks of DeepSpeed's engine: files under `save_dir/tag`, read back by a load."""

    def __init__(self):
        self.weight = torch.tensor(0.0)

    def save_checkpoint(self, save_dir, tag, save_latest):
        assert not save_latest
        folder = Path(save_dir, tag)
        folder.mkdir(parents=True, exist_ok=True)
        torch.save({"weight": self.weight}, folder / "model_states.pt")
        torch.save({"moment": self.weight * 2}, folder / "optim_states.pt")

    def load_checkpoint(self, load_dir, tag):
        folder = Path(load_dir, tag)
        self.weight = torch.load(folder / "model_states.pt")["weight"]
        assert torch.equal(torch.load(folder / "optim_states.pt")["moment"], self.weight * 2)


class Crash(Exception):
    pass


def crash_at(point):
    def fault(reached):
        if reached == point:
            raise Crash(point)

    return fault


def kill_at(point):
    def fault(reached):
        if reached == point:
            os.kill(os.getpid(), signal.SIGKILL)

    return fault


def save(checkpointer, step, run="first"):
    """Step `step`'s checkpoint: the engine's weight, the trainer's state and the config all say `step`."""
    engine = FakeEngine()
    engine.weight = torch.tensor(float(step))
    return checkpointer.save(engine, step, {"step": step, "run": run}, {"config.yaml": f"step: {step}\n"})


def resume(run_dir):
    """A restarted run's view: the step it resumes from, checked to be one whole checkpoint."""
    engine = FakeEngine()
    state = Checkpointer(run_dir, keep_last=2).load(engine)
    assert engine.weight.item() == state["step"]
    return state["step"]


def entries(run_dir):
    return sorted(p.name for p in (Path(run_dir) / "checkpoints").iterdir())


def assert_every_complete_name_is_whole(run_dir):
    """A directory named step_N holds all of step N, whatever was killed."""
    for path in (Path(run_dir) / "checkpoints").glob("step_*"):
        if path.name.removeprefix("step_").isdigit():
            assert {p.name for p in path.iterdir()} == CHECKPOINT_FILES, path
            assert (path / "config.yaml").read_text() == f"step: {path.name.removeprefix('step_')}\n"


@pytest.fixture
def one_rank():
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    close_distributed()


def test_a_save_is_published_and_loads_with_the_rng(one_rank, tmp_path):
    checkpointer = Checkpointer(tmp_path, keep_last=2)
    assert checkpointer.latest() is None and checkpointer.load(FakeEngine()) is None
    torch.manual_seed(7)
    published = save(checkpointer, 1)
    expected = torch.rand(3)
    torch.manual_seed(99)
    assert checkpointer.latest() == published == tmp_path / "checkpoints" / "step_1"
    assert resume(tmp_path) == 1
    assert torch.equal(torch.rand(3), expected)
    assert entries(tmp_path) == ["latest", "step_1"]
    assert_every_complete_name_is_whole(tmp_path)


def test_everything_is_fsynced_before_it_is_renamed_and_published(one_rank, tmp_path, monkeypatch):
    events = []
    fsync, rename, replace = os.fsync, os.rename, os.replace

    def recording_fsync(descriptor):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{descriptor}")))
        fsync(descriptor)

    def recording(name, call):
        def wrapped(source, target):
            events.append((name, str(target)))
            call(source, target)

        return wrapped

    monkeypatch.setattr(os, "fsync", recording_fsync)
    monkeypatch.setattr(os, "rename", recording("rename", rename))
    monkeypatch.setattr(os, "replace", recording("replace", replace))
    root = tmp_path / "checkpoints"
    save(Checkpointer(tmp_path, keep_last=2), 1)
    renamed = events.index(("rename", str(root / "step_1")))
    published = events.index(("replace", str(root / "latest")))
    before_rename = {path for kind, path in events[:renamed] if kind == "fsync"}
    written = [root / "step_1.partial" / p.relative_to(root / "step_1") for p in (root / "step_1").rglob("*")]
    assert {str(path) for path in written} | {str(root / "step_1.partial")} <= before_rename
    assert ("fsync", str(root)) in events[renamed:published]  # the rename itself
    assert ("fsync", str(root / ".latest.tmp")) in events[renamed:published]
    assert events[published + 1] == ("fsync", str(root))


def test_a_published_checkpoint_is_never_rewritten(one_rank, tmp_path):
    """The data ran out right after a save: the trainer saves the same step again."""
    checkpointer = Checkpointer(tmp_path, keep_last=2)
    published = save(checkpointer, 5)
    written = {p.name: p.stat().st_mtime_ns for p in published.iterdir()}
    engine = FakeEngine()
    engine.weight = torch.tensor(-1.0)
    assert checkpointer.save(engine, 5, {"step": -1}) == published
    assert {p.name: p.stat().st_mtime_ns for p in published.iterdir()} == written
    assert resume(tmp_path) == 5 and entries(tmp_path) == ["latest", "step_5"]
    for call in (checkpointer.begin, checkpointer.commit):
        with pytest.raises(ValueError, match="step_5 is the published checkpoint"):
            call(5)


def test_pruning_keeps_the_newest_complete_ones_and_clears_leftovers(one_rank, tmp_path):
    """Partial, half-deleted and rolled-back directories neither count towards keep_last nor stay."""
    root = tmp_path / "checkpoints"
    for leftover in ("step_8.partial", "step_1.discarded", "step_50"):  # step_50: written, never published
        (root / leftover).mkdir(parents=True)
        (root / leftover / "model_states.pt").write_text("")
    (root / ".latest.tmp").write_text("step_50")
    checkpointer = Checkpointer(tmp_path, keep_last=2)
    save(checkpointer, 1)
    assert entries(tmp_path) == ["latest", "step_1"]
    for step in (2, 3):
        save(checkpointer, step)
    assert entries(tmp_path) == ["latest", "step_2", "step_3"]
    assert resume(tmp_path) == 3


@pytest.mark.parametrize("point", SAVE_POINTS)
def test_a_crash_at_each_point_resumes_from_a_complete_checkpoint(one_rank, tmp_path, point):
    faulty = Checkpointer(tmp_path, keep_last=2, fault=crash_at(point))
    for step in (1, 2, 3):
        save(Checkpointer(tmp_path, keep_last=2), step)
    with pytest.raises(Crash):
        save(faulty, 4)
    assert_every_complete_name_is_whole(tmp_path)
    resumed = resume(tmp_path)
    assert resumed == (4 if point in PUBLISHED_AT else 3)
    # The resumed run saves its next two steps; what the crash left (a partial or half-deleted directory,
    # an unpublished step_4) is gone, and step_4, if written again, holds the new run's state.
    checkpointer = Checkpointer(tmp_path, keep_last=2)
    kept = [save(checkpointer, step, run="resumed") for step in (resumed + 1, resumed + 2)]
    assert entries(tmp_path) == ["latest", *(path.name for path in kept)]
    assert all(torch.load(path / "trainer_rank0.pt")["run"] == "resumed" for path in kept)
    assert_every_complete_name_is_whole(tmp_path)
    assert resume(tmp_path) == resumed + 2


def test_a_crash_while_deleting_leaves_no_half_checkpoint_under_a_complete_name(one_rank, tmp_path):
    """Killed midway through deleting step_1: what is left of it is not taken for a checkpoint."""

    def half_delete(point):
        if point == "pruning":
            (tmp_path / "checkpoints" / "step_1.discarded" / "model_states.pt").unlink()
            raise Crash(point)

    save(Checkpointer(tmp_path, keep_last=1), 1)
    with pytest.raises(Crash):
        save(Checkpointer(tmp_path, keep_last=1, fault=half_delete), 2)
    assert entries(tmp_path) == ["latest", "step_1.discarded", "step_2"]
    assert resume(tmp_path) == 2
    save(Checkpointer(tmp_path, keep_last=1), 3)
    assert entries(tmp_path) == ["latest", "step_3"]


@pytest.mark.parametrize("point", ["engine_saved", "pruning"])
def test_a_process_sigkilled_mid_save_resumes(one_rank, tmp_path, point):
    killed = subprocess.run(
        [sys.executable, __file__, str(tmp_path), point],
        capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(REPO)},
    )  # fmt: skip
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert_every_complete_name_is_whole(tmp_path)
    resumed = resume(tmp_path)
    assert resumed == (3 if point in PUBLISHED_AT else 2)
    save(Checkpointer(tmp_path, keep_last=2), resumed + 1)
    assert entries(tmp_path) == ["latest", f"step_{resumed}", f"step_{resumed + 1}"]


if __name__ == "__main__":
    run_dir, point = sys.argv[1:]
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    for step in (1, 2):
        save(Checkpointer(run_dir, keep_last=2), step)
    save(Checkpointer(run_dir, keep_last=2, fault=kill_at(point)), 3)
