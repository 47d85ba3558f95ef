"""One clear message per mistake, through the entry points as users start them: a paragraph from rank 0
that names the problem and the fix, no traceback on the console, nothing repeated by the other rank; and
Ctrl-C ends with the checkpoint a re-run resumes from."""

import signal
import socket
import subprocess
import sys
import time

import pytest

from tests.conftest import REPO
from tests.integration.test_pretrain import environment

CPU = ["+recipe=phase1", "+cpu=pretrain", "logging.mode=disabled"]


def torchrun(*arguments: str) -> list[str]:
    script = str(REPO / "launch" / "pretrain.py")
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", script, *arguments]


def paragraphs(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error: ")]


@pytest.mark.slow
def test_each_mistake_is_one_paragraph_from_rank_zero(pretrain_corpus, tmp_path):
    cases = [
        (["+cpu=pretrain", "+recipe=phase1"], "error: give +cpu=... after +recipe=..."),
        ([*CPU, "trainer.max_step=5"], "error: unknown config key trainer.max_step: did you mean trainer.max_steps?"),
        ([*CPU, "+trainer.max_step=5"], "error: unknown config key trainer.max_step: did you mean trainer.max_steps?"),
        (
            [*CPU, f"data.train={tmp_path / 'mine.json'}"],
            f"error: data.sources.train: {tmp_path / 'mine.json'} is a JSONL",
        ),
        (
            [*CPU, f"data.train={tmp_path / 'broken.jsonl'}", "data.max_epochs=1"],
            "error: the data ran out before the first step: no sample could be packed",
        ),
        ([*CPU, f"tokenizer={tmp_path / 'nowhere'}"], f"error: tokenizer={tmp_path / 'nowhere'}: no such directory."),
        ([*CPU, "trainer.max_steps=x"], "error: trainer.max_steps: Value 'x' of type 'str' could not be converted"),
    ]
    (tmp_path / "mine.json").write_text('{"messages": []}\n')
    (tmp_path / "broken.jsonl").write_text("{not json\n" * 4)
    for overrides, message in cases:
        arguments = [f"data.root={pretrain_corpus}", f"trainer.output_dir={tmp_path / 'run'}", *overrides]
        done = subprocess.run(torchrun(*arguments), capture_output=True, text=True, timeout=300, env=environment())
        assert done.returncode != 0
        errors = paragraphs(done.stderr)
        assert len(errors) == 1 and errors[0].startswith(message), done.stderr[-3000:]
        ours = done.stderr.split("torch/distributed/elastic")[0]  # then torchrun's own report of the exit codes
        assert "[rank1]" not in ours and "Traceback" not in ours, done.stderr[-3000:]
    log = (tmp_path / "run" / "errors" / "rank1.log").read_text()
    assert "Traceback" in log and "max_steps" in log  # the last case: the other rank's traceback, kept


@pytest.mark.slow
def test_ctrl_c_says_which_checkpoint_a_rerun_resumes_from(pretrain_corpus, tmp_path):
    out = tmp_path / "run"
    plain = [sys.executable, str(REPO / "launch" / "pretrain.py"), *CPU, f"data.root={pretrain_corpus}",
             f"trainer.output_dir={out}", "trainer.max_steps=500", "trainer.save_every=2"]  # fmt: skip
    # SIGINT as a terminal's Ctrl-C delivers it, even where pytest was started with it ignored (a background job)
    process = subprocess.Popen(plain, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=environment(),
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # fmt: skip
    deadline = time.monotonic() + 240
    while not (out / "checkpoints" / "latest").exists() and time.monotonic() < deadline:
        time.sleep(0.5)
    second = subprocess.run(plain, capture_output=True, text=True, timeout=300, env=environment())
    (error,) = paragraphs(second.stderr)
    holder = f"error: {out} is in use by another run (host {socket.gethostname()}, PID {process.pid}, since "
    assert second.returncode == 1 and error.startswith(holder), second.stderr[-3000:]
    assert process.poll() is None  # the first run goes on
    process.send_signal(signal.SIGINT)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr[-3000:]
    latest = (out / "checkpoints" / "latest").read_text().strip()
    last = stderr.strip().splitlines()[-1]
    assert last == f"interrupted. Re-running the same command resumes from {out / 'checkpoints' / latest} " + (
        f"({latest.replace('_', ' ')})."
    ), stderr[-3000:]
    assert "KeyboardInterrupt" not in stderr + stdout

    again = subprocess.run([*plain[:-2], "trainer.max_steps=4", "trainer.save_every=2"], capture_output=True,
                           text=True, timeout=300, env=environment())  # fmt: skip
    assert again.returncode == 0, again.stderr[-3000:]
    step = int(latest.removeprefix("step_"))
    said = again.stdout + again.stderr
    assert "building the model and starting DeepSpeed ZeRO-3 (world size 1)" in said  # start-up says what it does
    assert "s; starting the data loaders (" in said
    assert "tokens (of" not in said  # max_steps ends a CPU run long before the recipe's 900B tokens
    if step >= 4:
        assert f"has already finished: step {step} (of 4)" in said, said[-3000:]
    else:
        assert f"resumed from step {step} (of 4)" in said and "finished: step 4 (of 4)" in said, said[-3000:]
