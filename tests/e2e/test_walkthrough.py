"""A new user's first hour, as the docs tell it: every CPU command of README.md and docs/, run as written,
in order, in a fresh working directory (the repository's files linked in, its own `outputs/`).

`make demo` runs the docs' pipeline commands itself, word for word (it prints each, and each printed one
must be in the docs), and their metrics show what the docs promise: losses that fall, a reward model that
learns, rewards that rise; and the figures the docs quote from them (tagged `<!--demo NAME-->`) are the
demo's (its figures.json). Those commands are not run a second time. Any other command is run here; one
that names a demo run's directory must be the demo's (it finds the run finished, and leaves its
config.yaml as it was), so a training command that drifted from the demo's fails."""

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch

from step3vl_train.data.sources import read_tar_shard
from step3vl_train.model import Step3VLForConditionalGeneration
from step3vl_train.processing.images import load_image
from step3vl_train.processing.processor import load_processor
from step3vl_train.train.reward_model import load_reward_model, reward_conversation, score_samples
from tests.conftest import REPO
from tests.e2e.docs import Command, commands, drifted, quoted_figures, script_and_overrides

WALKTHROUGH = ["README.md", "docs/training.md", "docs/rl.md", "docs/rlhf.md", "docs/pacore.md", "docs/evaluation.md",
               "docs/data.md", "docs/gpu.md"]  # fmt: skip
NOT_RUN = {"make test": "it runs this test"}
VENV = Path(os.environ.get("VIRTUAL_ENV", REPO / ".venv"))
RLHF_RISE = 0.15  # of the mean RM score (0-1), first 3 iterations to last 3
TRAINING_SCRIPTS = ("launch/pretrain.py", "launch/sft.py", "launch/train_rm.py", "rl/run.py")


def metric(run_dir: Path, key: str) -> list[float]:
    """`key` in each row of the run's metrics.jsonl that has it."""
    rows = map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
    return [row[key] for row in rows if key in row]


def workspace(root: Path) -> Path:
    for entry in REPO.iterdir():
        if entry.name not in {"outputs", ".git", ".venv"} and not entry.name.endswith(".egg-info"):
            (root / entry.name).symlink_to(entry)
    return root


def run(command: Command, cwd: Path) -> subprocess.CompletedProcess:
    environment = {**os.environ, "PATH": f"{VENV / 'bin'}:{os.environ['PATH']}", "VENV": str(VENV),
                   "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}  # fmt: skip
    done = subprocess.run(["bash", "-c", command.text], cwd=cwd, env=environment, capture_output=True, text=True,
                          timeout=900)  # fmt: skip
    assert done.returncode == 0, f"{command}\n{done.stdout[-3000:]}\n{done.stderr[-5000:]}"
    return done


def run_dir(command: Command, cwd: Path) -> Path | None:
    """The run directory of a training command: its trainer.output_dir."""
    script, arguments = script_and_overrides(command)
    if script not in TRAINING_SCRIPTS:
        return None
    return cwd / next(a.split("=", 1)[1] for a in arguments if a.startswith("trainer.output_dir="))


@pytest.mark.slow
def test_the_documented_cpu_commands_work_as_written(tmp_path):
    if not (VENV / ".installed").exists():
        pytest.skip(f"make demo uses the environment make built; {VENV} is not one")
    cwd = workspace(tmp_path)
    ran, by_demo = [], set()
    for command in (c for c in commands() if not c.gpu):
        assert command.document in WALKTHROUGH, command
        if " ".join(command.words) in NOT_RUN or uncommented(command) in by_demo:
            continue
        directory = run_dir(command, cwd) if command.words[0] != "make" else None
        config = (directory / "config.yaml").read_text() if directory else None
        done = run(command, cwd)
        ran.append(command)
        if command.text.startswith("make demo"):
            by_demo = {line.split(": ", 1)[1] for line in done.stdout.splitlines() if line.startswith("== ")}
            check_demo(cwd / "outputs" / "demo", by_demo, done.stdout, {uncommented(c) for c in commands()})
        elif directory:
            # the demo's run, re-entered: finished, with the same config
            assert "has already finished" in done.stdout + done.stderr, command
            assert (directory / "config.yaml").read_text() == config, f"{command} is not the demo's command"
    assert len(ran) >= 9 and len(by_demo) >= 22
    check_rl_run(cwd / "outputs" / "demo")


def uncommented(command: Command) -> str:
    return command.text.split("  #")[0].strip()


def check_demo(out: Path, ran: set[str], stdout: str, documented: set[str]) -> None:
    """`make demo`: the photo demo's steps, then every stage of the pipeline doing its job."""
    rows = [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]
    steps = {row["step"]: row for row in rows}
    assert steps["processed"]["num_crops"] == 6 and steps["processed"]["image_tokens"] == 6 * 9 + 16
    assert steps["save_reload"]["logits_identical"] is True and steps["generate"]["new_tokens"] > 0
    assert steps["data"]["skipped_samples"] == 0 and steps["data"]["samples"] > 2
    assert ran and ran <= documented, ran - documented  # the pipeline runs the docs' commands, word for word
    for stage in ("pretrain", "sft", "sft2"):
        loss = metric(out / stage, "loss")
        assert loss[-1] < loss[0] - 1.0, (stage, loss)
        validation = metric(out / stage, "eval/loss")  # held-out samples, the same at each validation
        assert len(validation) >= 3 and validation[-1] < validation[0], (stage, validation)
    phases, lr = metric(out / "pretrain", "phase"), metric(out / "pretrain", "lr")
    assert phases[0] == 0 and phases[-1] == 1 and lr[-1] < lr[0] / 2  # phase 2 took over, its lr leg going down
    reward = metric(out / "rlvr", "reward_mean")
    first, last = sum(reward[:3]) / 3, sum(reward[-3:]) / 3
    assert last >= first + 0.08, reward
    assert max(metric(out / "rlvr", "logprob_mismatch/max_abs")) < 1e-4  # engine and trainer agree
    summary = (out / "summary.md").read_text()
    assert f"| RLVR (reward_mean) | {len(reward)} | {first:.3f} | {last:.3f} |" in summary
    assert "`reward_mean`: the share of responses" in summary
    accuracy = metric(out / "rm", "eval/accuracy")
    assert accuracy[-1] >= 0.95, accuracy  # held-out pairs, another seed's
    score = metric(out / "rlhf", "reward/rm")
    first, last = sum(score[:3]) / 3, sum(score[-3:]) / 3
    assert last >= first + RLHF_RISE, score
    assert f"| RLHF (RM score) | {len(score)} | {first:.3f} | {last:.3f} |" in summary
    for stage in ("rlvr", "rlhf", "pacore"):
        assert (out / stage / "reward_curve.png").read_bytes()[:4] == b"\x89PNG"
    for stage in ("pretrain", "sft", "sft2"):  # training and validation loss
        assert (out / stage / "loss_curve.png").read_bytes()[:4] == b"\x89PNG"
        assert f"`{stage}/loss_curve.png`" in summary
    wrong = drifted(quoted_figures(), json.loads((out / "figures.json").read_text()))
    assert not wrong, "\n".join(wrong)
    benchmark = json.loads((out / "eval" / "synthetic" / "summary.json").read_text())["modes"]
    for mode in ("sere", "pacore"):
        low, high = benchmark[mode]["ci95"]
        assert low <= benchmark[mode]["accuracy"] <= high and f"{benchmark[mode]['accuracy']:.3f} [" in summary


def check_rl_run(demo: Path) -> None:
    """The demo's RLVR run, as docs/rl.md describes it, and its export (docs/rl.md's last CPU command)."""
    rows = [json.loads(line) for line in (demo / "rlvr" / "metrics.jsonl").read_text().splitlines()]
    before, rows = rows[0], rows[1:]  # the held-out prompts before training: a row of its own, step 0
    steps = len(rows)
    assert before["step"] == 0 and set(before) >= {"eval/reward", "eval/pass@1", "eval/reward/choice"}
    assert [row["step"] for row in rows] == list(range(1, steps + 1))
    assert [row["step"] for row in rows if "eval/reward" in row] == list(range(10, steps + 1, 10))
    for row in rows:
        assert row["logprob_mismatch/max_abs"] < 1e-4  # engine and trainer score the same tokens, every sync
        for key in ("pass_rate", "response_len_mean", "clip_fraction", "value_loss", "entropy", "reward/choice",
                    "time/rollout", "time/reward", "time/score", "time/update", "time/sync", "sync/bytes"):  # fmt: skip
            assert key in row, key
    # The frozen encoder crosses once, when the engine starts; each iteration sends the trainable tensors.
    initial = Step3VLForConditionalGeneration.from_pretrained(demo / "sft2_hf")
    names = [name for name, _ in initial.named_parameters()]
    assert rows[0]["sync_start/tensors"] == len(names) and all("sync_start/tensors" not in r for r in rows[1:])
    assert all(row["sync/tensors"] == len([n for n in names if not n.startswith("vision_model.")]) for row in rows)
    logged = [json.loads(line) for line in (demo / "rlvr" / "rollouts.jsonl").read_text().splitlines()]
    assert len(logged) == steps * 8 and all(len(row["rewards"]) == 8 for row in logged)  # 8 prompts x 8
    policy = Step3VLForConditionalGeneration.from_pretrained(demo / "rlvr_hf")
    moved = [name for name, p in policy.named_parameters() if not torch.equal(p, initial.state_dict()[name])]
    assert moved and not any(name.startswith("vision_model.") for name in moved)  # the encoder stays frozen
    check_rlhf_run(demo)
    check_pacore_runs(demo)


def check_rlhf_run(demo: Path) -> None:
    """The demo's reward model (its statistics come from the held-out pairs, and its export, loaded as the
    service loads it, ranks them) and RLHF run (scored by the service, every response: none masked)."""
    rows = [json.loads(line) for line in (demo / "rm" / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == list(range(1, len(rows) + 1))
    assert all({"loss", "accuracy", "margin", "reward_mean", "reward_std", "grad_norm"} <= set(row) for row in rows)
    evaluated = [row for row in rows if "eval/accuracy" in row]
    model, stats = load_reward_model(demo / "rm_hf")
    assert not model.training and stats.origin == "eval" and stats.step == rows[-1]["step"] and stats.pairs == 100
    assert (stats.mean, stats.std) == pytest.approx(
        (evaluated[-1]["eval/reward_mean"], evaluated[-1]["eval/reward_std"])
    )
    processor = load_processor("tiny", str(REPO / "configs" / "processor" / "tiny.yaml"))
    shard = demo / "synthetic" / "preference" / "heldout" / "pairs" / "shard-000000.tar"
    pairs = [sample for sample, _, _ in read_tar_shard(str(shard))]

    def scores(side: str) -> list[float]:
        rows = [processor(reward_conversation(s.messages, getattr(s, side)), [load_image(d) for d in s.images])
                for s in pairs]  # fmt: skip
        return score_samples(model, rows, processor.tokenizer.pad_token_id)

    assert all(c > r for c, r in zip(scores("chosen"), scores("rejected"), strict=True))
    rows = [json.loads(line) for line in (demo / "rlhf" / "metrics.jsonl").read_text().splitlines()]
    for row in rows:
        assert row["logprob_mismatch/max_abs"] < 1e-4
        for key in ("reward/rm", "reward/language", "reward/overconfidence", "citations/fabricated",
                    "service/latency_p50", "service/latency_p99", "value_loss"):  # fmt: skip
            assert key in row, key
        assert not any(f"reward_status/{status}" in row for status in ("timeout", "error", "unparsed")), row


def check_pacore_runs(demo: Path) -> None:
    """The demo's PaCoRe: pools of the RLVR policy's rollouts, a training run whose prompts were given
    messages from them, and inference on held-out prompts, one synthesis a problem after its 8 rollouts."""
    pools = [json.loads(line) for line in (demo / "pools" / "difficulty.jsonl").read_text().splitlines()]
    assert pools and all(len(row["pool"]) == 8 for row in pools)
    assert all(entry["model"].endswith("rlvr_hf") for row in pools for entry in row["pool"])
    rows = [json.loads(line) for line in (demo / "pacore" / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == list(range(1, len(rows) + 1))
    for row in rows:
        assert 4 <= row["pacore/messages"] <= 8 and 0 <= row["pacore/message_reward"] <= 1
        assert 0 <= row["pacore/synthesis_reward"] <= 1 and row["logprob_mismatch/max_abs"] < 1e-4
    logged = [json.loads(line) for line in (demo / "pacore" / "rollouts.jsonl").read_text().splitlines()]
    assert all(4 <= len(row["messages"]) <= 8 for row in logged)
    results = [json.loads(line) for line in (demo / "pacore_inference" / "results.jsonl").read_text().splitlines()]
    assert len(results) == 4 and all(len(r["rounds"]) == 2 and len(r["rounds"][0]) == 8 for r in results)
    assert all(len(r["sere_rewards"]) == 8 and r["final"] is not None for r in results)
