"""launch/pretrain.py over 2 ranks of ZeRO-3 on the CPU (gloo), on the synthetic corpus."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from step3vl_train.data.synthetic.tasks import write_corpus
from tests.conftest import REPO
from tests.train.wandb_history import current_offline_run, logged_steps

# The pre-training recipe, switched to the tiny model from random weights with short sequences, one
# micro-batch a step and a flat learning rate, as the CPU runs it.
TINY = [
    "trainer.from_scratch=true", "model=tiny", "processor=tiny", "tokenizer=tiny",
    "data.packing.seq_len=512",
    "data.packing.window=4", "data.num_workers=1", "optim.lr=1e-3", "optim.schedule.shape=constant",
    "optim.schedule.warmup_tokens=0", "trainer.grad_accum=1", "trainer.gradient_checkpointing=false",
    "logging.mode=disabled",
]  # fmt: skip


def command(corpus, out, *overrides, recipe="pretrain"):
    return [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", str(REPO / "launch" / "pretrain.py"),
        f"+recipe={recipe}", *TINY, f"data.root={corpus}", f"trainer.output_dir={out}", *overrides,
    ]  # fmt: skip


def environment():
    # The repository root on the path, for the helper scripts that import from tests/.
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}


def losses(out):
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [(row["step"], row["loss"]) for row in rows]


def run(corpus, out, *overrides, recipe="pretrain"):
    done = subprocess.run(
        command(corpus, out, *overrides, recipe=recipe), capture_output=True, text=True, timeout=600, env=environment()
    )
    assert done.returncode == 0, done.stderr[-4000:]
    return losses(out)


@pytest.fixture(scope="module")
def large_corpus(tmp_path_factory):
    """80 samples a source: 10 steps of both phases read none twice."""
    out = tmp_path_factory.mktemp("synthetic") / "pretrain"
    write_corpus("pretrain", str(out), num=640, seed=0, shard_size=20)
    return out


def started_until(corpus, out, *overrides, recipe, at_step, stderr=subprocess.DEVNULL) -> subprocess.Popen:
    """The run, started (in a session of its own) and left running until its metrics show `at_step`."""
    process = subprocess.Popen(
        command(corpus, out, *overrides, recipe=recipe), env=environment(), start_new_session=True,
        stdout=subprocess.DEVNULL, stderr=stderr, text=True,
    )  # fmt: skip
    deadline = time.time() + 300
    while time.time() < deadline and process.poll() is None:
        if (out / "metrics.jsonl").exists() and any(step >= at_step for step, _ in losses(out)):
            break
        time.sleep(0.05)
    return process


def killed(corpus, out, *overrides, recipe, at_step):
    """The run SIGKILLed once its metrics show `at_step` (torchrun starts each rank in a session of its own)."""
    process = started_until(corpus, out, *overrides, recipe=recipe, at_step=at_step)
    subprocess.run(["pkill", "-KILL", "-f", f"trainer.output_dir={out}"])
    process.wait()
    return (out / "checkpoints" / "latest").read_text()


def terminated(corpus, out, *overrides, recipe, at_step):
    """The run sent SIGTERM once its metrics show `at_step`, to rank 1 and its loader worker alone (as a
    scheduler signalling the process group would reach them): rank 0, which never receives it, stops at the
    same step all the same. Returns the exit code and torchrun's stderr (rank 0's last line, then torchrun's)."""
    process = started_until(corpus, out, *overrides, recipe=recipe, at_step=at_step, stderr=subprocess.PIPE)
    ranks = subprocess.run(["pgrep", "-P", str(process.pid)], capture_output=True, text=True).stdout.split()
    rank1 = next(pid for pid in ranks if "RANK=1" in Path(f"/proc/{pid}/environ").read_bytes().decode().split("\0"))
    loader = subprocess.run(["pgrep", "-P", rank1], capture_output=True, text=True).stdout.split()
    for pid in [rank1, *loader]:
        os.kill(int(pid), signal.SIGTERM)
    _, stderr = process.communicate(timeout=300)
    return process.returncode, stderr


def sample_keys(out):
    """Each rank's sample keys, step by step."""
    return [
        [(row["step"], row["keys"]) for row in map(json.loads, (out / "samples" / f"rank{rank}.jsonl").open())]
        for rank in range(2)
    ]


def validations(out):
    """Each validated step's `eval/*` figures."""
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {row["step"]: {k: v for k, v in row.items() if k.startswith("eval/")} for row in rows if "eval/loss" in row}


@pytest.mark.slow
def test_phase1_then_phase2_killed_in_each_is_the_one_uninterrupted_run(large_corpus, tmp_path):
    """`+recipe=pretrain` straight through the switch to a text-only phase 2, against `+recipe=phase1` and
    `+recipe=phase2 trainer.continue_from=...`, the first SIGKILLed once, the second stopped by SIGTERM at a
    step that is not a multiple of save_every (saved all the same, exit code 143, the resume line, no process
    left), each resumed: the same losses, the same samples (none read twice), and a W&B history of one row
    per step. The straight run and phase 1
    validate every 4 steps and at their last: the same figures at the same steps, none skipped or repeated
    by the resume; phase 2 does not validate, and its losses are still the straight run's."""
    text_only = "{text:1,caption:0,interleaved:0,ocr:0,grounding:0,counting:0,chart:0,math:0}"
    settings = [
        "trainer.max_steps=10", "trainer.save_every=2", "phases.phase2.start_tokens=4000",
        f"phases.phase2.weights={text_only}", "trainer.log_sample_keys=true", "logging.mode=offline",
    ]  # fmt: skip
    validation = [
        "data.eval=[{name:text,paths:[text/*.tar]},{name:caption,paths:[caption/*.tar]}]",
        "data.eval_max_samples=2", "trainer.eval_every=4",
    ]  # fmt: skip
    straight = run(large_corpus, tmp_path / "straight", *settings, *validation)
    rows = [json.loads(line) for line in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()]
    switch = next(row["step"] for row in rows if row["phase"] == 1)
    assert 3 <= switch <= 8 and [row["phase"] for row in rows] == [0] * (switch - 1) + [1] * (11 - switch)
    assert all(row["flops/decoder"] > 0 and row["tflops_per_s"] > 0 and "mfu" not in row for row in rows)
    straight_keys = sample_keys(tmp_path / "straight")
    every_key = [key for rank in straight_keys for _, keys in rank for key in keys]
    assert len(every_key) == len(set(every_key))
    assert {key.rsplit(":", 1)[1].split("-")[0] for _, keys in straight_keys[0][-2:] for key in keys} == {"text"}

    evaluated = validations(tmp_path / "straight")
    assert list(evaluated) == [4, 8, 10] and len({figures["eval/tokens"] for figures in evaluated.values()}) == 1
    assert all(figures["eval/samples"] == 4 and figures["eval/loss/caption"] > 0 for figures in evaluated.values())

    first, second = tmp_path / "phase1", tmp_path / "phase2"
    latest = killed(large_corpus, first, *settings, *validation, recipe="phase1", at_step=switch - 2)
    assert latest in [f"step_{n}" for n in range(2, switch, 2)]
    run(large_corpus, first, *settings, *validation, recipe="phase1")
    first_evaluated = validations(first)
    assert list(first_evaluated) == sorted({step for step in (4,) if step < switch - 1} | {switch - 1})
    assert all(first_evaluated[step] == evaluated[step] for step in first_evaluated if step in evaluated)
    phase2 = [f"trainer.continue_from={first}", *settings]
    rarely = [setting.replace("save_every=2", "save_every=100") for setting in phase2]  # only the stop saves
    code, stderr = terminated(large_corpus, second, *rarely, recipe="phase2", at_step=switch)
    stopped = losses(second)[-1][0]  # the step every rank agreed to stop after
    assert sorted(path.name for path in (second / "checkpoints").glob("step_*")) == [f"step_{stopped}"]
    resumes = f"Re-running the same command resumes from {second / 'checkpoints' / f'step_{stopped}'} (step {stopped})."
    said = re.search(rf"\nstopped by SIGTERM at step {stopped} \(of 10\)[^\n]*\. {re.escape(resumes)}\n", stderr)
    assert said, stderr[-3000:]
    # torchrun's report of the ranks it saw exit (it stops the other one itself): 143, not a signal
    assert code != 0 and set(re.findall(r"exitcode  : (-?\d+)", stderr)) == {"143"}, stderr[-3000:]
    assert "Traceback" not in stderr.split("torch/distributed/elastic")[0], stderr[-3000:]
    assert subprocess.run(["pgrep", "-f", f"trainer.output_dir={second}"]).returncode == 1  # no process left
    resumed = run(large_corpus, second, *phase2, recipe="phase2")

    assert losses(first) + resumed == straight  # phase 2 unvalidated; the straight run validated at step 8
    assert validations(second) == {}
    assert [a + b for a, b in zip(sample_keys(first), sample_keys(second), strict=True)] == straight_keys
    for out in (first, second):  # the resumed W&B run holds each step once
        assert logged_steps(current_offline_run(out)) == [step for step, _ in losses(out)]


@pytest.mark.slow
def test_export_loads_where_the_released_model_loads_with_the_live_logits(pretrain_corpus, tmp_path):
    import torch

    from step3vl_train.model import Step3VLForConditionalGeneration
    from step3vl_train.processing.model_processor import saved_settings
    from tests.integration.export_run import fixed_batch

    out = tmp_path / "run"
    script = REPO / "tests" / "integration" / "export_run.py"
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
    trained = subprocess.run(
        [*launcher, str(script), str(pretrain_corpus), str(out)], capture_output=True, text=True, timeout=600,
        env=environment(),
    )  # fmt: skip
    assert trained.returncode == 0, trained.stderr[-4000:]
    exported = subprocess.run(
        [sys.executable, str(REPO / "launch" / "export_hf.py"), f"checkpoint={out}", f"out={tmp_path / 'hf'}"],
        capture_output=True, text=True, timeout=300, env=environment(),
    )  # fmt: skip
    assert exported.returncode == 0, exported.stderr[-4000:]
    model = Step3VLForConditionalGeneration.from_pretrained(tmp_path / "hf")
    with torch.no_grad():
        logits = model(**fixed_batch()).logits
    torch.testing.assert_close(logits, torch.load(out / "live_logits.pt"), rtol=1e-5, atol=1e-5)
    assert (tmp_path / "hf" / "tokenizer.json").exists()
    assert saved_settings(tmp_path / "hf")["image_size"] == 224  # the run's processor: configs/processor/tiny.yaml
    # The export starts another run: with a learning rate of 0 its first checkpoint holds the same weights.
    from step3vl_train.model.checkpoint import read_released_tensors

    follow = tmp_path / "follow"
    run(pretrain_corpus, follow, "trainer.max_steps=1", "optim.lr=0", f"trainer.init_from={tmp_path / 'hf'}")
    again = subprocess.run(
        [sys.executable, str(REPO / "launch" / "export_hf.py"), f"checkpoint={follow}", f"out={tmp_path / 'hf2'}"],
        capture_output=True, text=True, timeout=300, env=environment(),
    )  # fmt: skip
    assert again.returncode == 0, again.stderr[-4000:]
    first, second = read_released_tensors(tmp_path / "hf"), read_released_tensors(tmp_path / "hf2")
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)


@pytest.mark.slow
def test_held_out_shards_skip_counts_and_a_changed_world_size(pretrain_corpus, tmp_path):
    """Our own held-out shards (broken samples included) through the entry point: the skips are counted
    right. Then the same run with one rank instead of two, started without torchrun (one rank of one), is
    refused, naming the way out."""
    from tests.data.broken_data import EXPECTED_SKIPS, write_held_out

    held_out = write_held_out(str(tmp_path / "held_out"))
    out = tmp_path / "run"
    run(pretrain_corpus, out, "trainer.max_steps=1", f"data.train={tmp_path / 'held_out'}/*.tar",
        "data.max_epochs=1", "trainer.save_every=1", "trainer.keep_last=1")  # fmt: skip
    skips = json.loads((out / "data_skips.json").read_text())
    assert skips["met"] == skips["samples"] == {**EXPECTED_SKIPS, "unreadable_shard": 1}  # one pass: each met once
    assert skips["unreadable_shards"] == [str(tmp_path / "held_out" / "truncated-000000.tar")]  # whichever rank
    assert held_out[-1].endswith("gone-000000.tar")  # not matched by the glob: only the truncated shard
    assert sorted(p.name for p in (out / "checkpoints").glob("step_*")) == ["step_1"]
    torchrun = command(pretrain_corpus, out, "trainer.max_steps=2")
    plain = [sys.executable, *torchrun[torchrun.index(str(REPO / "launch" / "pretrain.py")) :]]
    done = subprocess.run(plain, capture_output=True, text=True, timeout=300, env=environment())
    assert done.returncode != 0
    assert "written by 2 ranks and this run has 1" in done.stderr and "export_hf.py" in done.stderr
    assert done.stderr.count("written by 2 ranks") == 1 and "Traceback" not in done.stderr


@pytest.mark.slow
def test_the_loss_falls_to_near_zero_on_four_documents(tmp_path):
    """Overfitting a tiny set, with activation checkpointing on: the whole loop learns."""
    documents = ["the cat sat on the mat and looked at the river", "numbers grow when you add them: 12 plus 30 is 42",
                 "a red circle is left of a blue square", "careful reasoning checks each step"]  # fmt: skip
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in documents))
    losses_by_step = run(
        tmp_path, tmp_path / "run", f"data.sources=[{{name:docs,kind:jsonl,paths:[{tmp_path / 'docs.jsonl'}]}}]",
        "~phases.phase2", "data.packing.seq_len=256", "data.packing.window=1", "data.num_workers=0", "optim.lr=3e-3",
        "trainer.gradient_checkpointing=true", "trainer.max_steps=60", "trainer.save_every=1000",
        "trainer.predict_every=30", "trainer.predict_max_new_tokens=4", "logging.mode=offline",
    )  # fmt: skip
    first, last = losses_by_step[0][1], losses_by_step[-1][1]
    assert first > 6 and last < 0.5, losses_by_step
    # Greedy answers to the default prompts (one with the photo, one text-only) at steps 30 and 60.
    predictions = [json.loads(line) for line in (tmp_path / "run" / "predictions.jsonl").read_text().splitlines()]
    assert [(p["step"], p["image"] is not None) for p in predictions] == [
        (30, True),
        (30, False),
        (60, True),
        (60, False),
    ]
    assert list((tmp_path / "run" / "wandb").glob("offline-run-*/files/media/table/predictions_*.table.json"))
