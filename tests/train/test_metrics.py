import json
import subprocess
import sys
from pathlib import Path

import pytest
import wandb

from step3vl_train.train import metrics as metrics_module
from step3vl_train.train.config import LoggingConfig
from step3vl_train.train.metrics import MetricsLog, read_jsonl, truncate_jsonl
from tests.train.wandb_history import current_offline_run, history, logged_steps, run_config, run_group

REPO = Path(__file__).resolve().parents[2]

# Logs steps FIRST..LAST (loss = OFFSET + step, an answer every even step), then closes or is SIGKILLed.
LOG_STEPS = """
import os, signal, sys
from pathlib import Path
from step3vl_train.train.config import LoggingConfig
from step3vl_train.train.metrics import MetricsLog

run_dir, end = Path(sys.argv[1]), sys.argv[6]
resume, first, last, offset = map(int, sys.argv[2:6])
log = MetricsLog(run_dir, resume, LoggingConfig(mode="offline"), {"lr": 1e-3})
for step in range(first, last + 1):
    log.write({"step": step, "loss": offset + step, "grad_norm": None})
    if step % 2 == 0:
        log.predictions(step, [{"image": None, "text": "2+2?", "prediction": str(offset + step)}])
if end == "kill":
    os.kill(os.getpid(), signal.SIGKILL)
log.close()
"""


def log_steps(run_dir: Path, resume: int, first: int, last: int, offset: int, end: str) -> int:
    command = [sys.executable, "-c", LOG_STEPS, str(run_dir), str(resume), str(first), str(last), str(offset), end]
    return subprocess.run(command, cwd=REPO, capture_output=True, timeout=120).returncode


def test_an_offline_resume_starts_a_linked_run_holding_each_step_once(tmp_path):
    run_dir = tmp_path / "run"
    assert log_steps(run_dir, 0, 1, 7, 0, "kill") == -9  # past the checkpoint of step 3
    dead = current_offline_run(run_dir)
    dead_id = json.loads((run_dir / "wandb.json").read_text())["run_id"]

    assert log_steps(run_dir, 3, 4, 9, 100, "close") == 0
    resumed = current_offline_run(run_dir)
    assert resumed != dead
    assert logged_steps(resumed) == list(range(1, 10))
    rows = read_jsonl(run_dir / "metrics.jsonl")
    assert [row["loss"] for row in rows] == [1, 2, 3, 104, 105, 106, 107, 108, 109]
    assert [row["loss"] for row in history(resumed)] == [row["loss"] for row in rows]
    assert [row["_step"] for row in history(resumed) if "predictions" in row] == [2, 4, 6, 8]
    answers = read_jsonl(run_dir / "predictions.jsonl")
    assert [(row["step"], row["prediction"]) for row in answers] == [(2, "2"), (4, "104"), (6, "106"), (8, "108")]
    assert run_group(resumed) == dead_id  # the first run's id names the group
    assert run_config(resumed) == {"lr": 1e-3, "resumed_from": {"run_id": dead_id, "step": 3}}


def test_truncate_jsonl_keeps_steps_up_to_the_checkpoint_and_drops_a_torn_last_line(tmp_path):
    path = tmp_path / "rollouts.jsonl"
    path.write_text("".join(json.dumps({"step": step}) + "\n" for step in (1, 2, 3, 4)) + '{"st')
    truncate_jsonl(path, 3)
    assert path.read_text() == '{"step": 1}\n{"step": 2}\n{"step": 3}\n'
    assert [p.name for p in tmp_path.iterdir()] == ["rollouts.jsonl"]


def test_a_kill_before_the_truncated_file_replaces_the_old_one_leaves_the_old_one(tmp_path, monkeypatch):
    path = tmp_path / "metrics.jsonl"
    original = '{"step": 1}\n{"step": 2}\n'
    path.write_text(original)

    def killed(source, destination):
        raise SystemExit("killed before the rename")

    monkeypatch.setattr(metrics_module.os, "replace", killed)
    with pytest.raises(SystemExit):
        truncate_jsonl(path, 1)
    assert path.read_text() == original


class FakeRun:
    def __init__(self):
        self.logged: list[tuple[int, list[str]]] = []

    def log(self, row: dict, step: int) -> None:
        self.logged.append((step, sorted(row)))

    def finish(self) -> None:
        pass


@pytest.fixture
def online(tmp_path, monkeypatch):
    """A run directory whose W&B run `old` (group `first`) logged steps 1..5 and answers at 2 and 4; W&B's
    `init` records its arguments and raises what `refusals` holds for its next calls."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "loss": s}) + "\n" for s in range(1, 6)))
    answer = {"image": None, "text": "q", "prediction": "a"}
    (run_dir / "predictions.jsonl").write_text("".join(json.dumps({"step": s, **answer}) + "\n" for s in (2, 4)))
    (run_dir / "wandb.json").write_text(json.dumps({"run_id": "old", "group": "first"}))
    calls, refusals, runs = [], [], []

    def init(**arguments):
        calls.append(arguments)
        if refusals:
            raise refusals.pop(0)
        runs.append(FakeRun())
        return runs[-1]

    monkeypatch.setattr(wandb, "init", init)
    return run_dir, calls, refusals, runs


def start(run_dir: Path, resume_step: int) -> MetricsLog:
    return MetricsLog(run_dir, resume_step, LoggingConfig(mode="online"), {"lr": 1e-3})


def test_online_a_run_that_logged_past_the_checkpoint_is_rewound_to_it(online):
    run_dir, calls, _, runs = online
    start(run_dir, 3)
    ((call),) = calls
    assert call["resume_from"] == "old?_step=3" and "resume" not in call and "id" not in call
    assert call["group"] == "first" and call["config"] == {"lr": 1e-3}
    assert runs[0].logged == []  # W&B keeps its own rows up to the rewind step
    assert json.loads((run_dir / "wandb.json").read_text()) == {"run_id": "old", "group": "first"}
    assert [row["step"] for row in read_jsonl(run_dir / "metrics.jsonl")] == [1, 2, 3]
    assert [row["step"] for row in read_jsonl(run_dir / "predictions.jsonl")] == [2]


def test_online_a_refused_rewind_starts_a_linked_run_that_replays_the_kept_rows(online):
    run_dir, calls, refusals, runs = online
    refusals.append(wandb.errors.CommError("rewind is not enabled for this entity"))
    start(run_dir, 3)
    refused, new = calls
    assert refused["resume_from"] == "old?_step=3"
    assert new["id"] != "old" and new["group"] == "first" and "resume_from" not in new
    assert new["config"] == {"lr": 1e-3, "resumed_from": {"run_id": "old", "step": 3}}
    assert runs[0].logged == [(1, ["loss", "step"]), (2, ["loss", "step"]), (2, ["predictions"]), (3, ["loss", "step"])]
    assert json.loads((run_dir / "wandb.json").read_text()) == {"run_id": new["id"], "group": "first"}


def test_online_a_run_that_logged_nothing_past_the_checkpoint_resumes_as_it_is(online):
    run_dir, calls, _, runs = online
    start(run_dir, 5)
    ((call),) = calls
    assert call["id"] == "old" and call["resume"] == "must" and "resume_from" not in call
    assert runs[0].logged == []


def test_online_the_first_start_is_a_new_run_heading_its_own_group(online):
    run_dir, calls, _, _ = online
    (run_dir / "wandb.json").unlink()
    (run_dir / "metrics.jsonl").unlink()
    (run_dir / "predictions.jsonl").unlink()
    start(run_dir, 0)
    ((call),) = calls
    assert call["group"] == call["id"] and call["config"] == {"lr": 1e-3}
    assert json.loads((run_dir / "wandb.json").read_text()) == {"run_id": call["id"], "group": call["id"]}
