"""data/filter_difficulty.py keeps the prompts a policy solves sometimes but not always; with
--save-messages, each prompt's rollouts become its PaCoRe message pool."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from rl.config import PromptsConfig
from rl.prompts import PromptLoader
from rl.rewards.types import SCORER_FAILURES
from step3vl_train.data.schema import POOL_ENTRY
from tests.conftest import REPO

TOOL = [sys.executable, str(REPO / "data" / "filter_difficulty.py")]
TINY = ["stage=rlvr", "model=tiny", "processor=tiny", "tokenizer=tiny"]


def run(out, k, *overrides, flags=()):
    command = [*TOOL, "--k", str(k), "--out", str(out), *flags, "--", *TINY, *overrides]
    environment = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, env=environment)
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_keeps_sometimes_solved_prompts_and_saves_their_messages(secret_task, tmp_path, tiny_processor):
    prompts, model = secret_task
    summary = run(tmp_path, 8, f"prompts.train={prompts}/*.tar", f"policy.init_from={model}",
                  "rollout.max_new_tokens=24", flags=["--save-messages"])  # fmt: skip
    rows = [json.loads(line) for line in (tmp_path / "difficulty.jsonl").read_text().splitlines()]
    assert summary["prompts"] == len(rows) == 64  # every prompt once
    kept = [row for row in rows if row["kept"]]
    assert all(0 < row["correct"] < row["scored"] for row in kept)
    assert all(row["correct"] in (0, row["scored"]) for row in rows if not row["kept"])
    assert 0 < summary["kept"] == len(kept) < 64  # the format model guesses: some but not all solved

    # Every prompt's row carries its 8 rollouts, kept or not; their rewards are the counts'.
    entries = [entry for row in rows for entry in row["pool"]]
    assert all(len(row["pool"]) == 8 for row in rows)
    assert all(set(entry) == set(POOL_ENTRY) for entry in entries)
    assert {entry["model"] for entry in entries} == {str(Path(model).resolve())}
    for row in rows:
        assert sum(e["reward"] is not None and e["reward"] >= 1.0 for e in row["pool"]) == row["correct"]
        assert sum(e["reward"] is not None for e in row["pool"]) == row["scored"]
    assert all((entry["reward"] is None) == (entry["status"] in SCORER_FAILURES) for entry in entries)
    assert all("</think>" not in entry["text"] for entry in entries)  # conclusions: what follows the reasoning
    assert all("\\boxed{7}" in entry["text"] for entry in entries if entry["reward"] == 1.0)
    assert all(not entry["finished"] for entry in entries if entry["status"] == "truncated")
    assert all(entry["finished"] for entry in entries if entry["status"] in ("ok", "no_answer"))
    assert {entry["finished"] for entry in entries} == {True, False}  # 24 tokens cut some rollouts short

    # Kept samples carry their pools, which the schema accepts.
    config = PromptsConfig(train=f"{tmp_path}/*.tar")
    reloaded = PromptLoader(config, tiny_processor, max_epochs=1, keep_pools=True).next_batch(100)
    assert sorted(p.key.rsplit(":", 1)[1] for p in reloaded) == sorted(r["key"].rsplit(":", 1)[1] for r in kept)
    assert all(p.answer == "7" and p.reward == "math" for p in reloaded)
    pools = {row["key"].rsplit(":", 1)[1]: row["pool"] for row in kept}
    assert all(p.pool == pools[p.key.rsplit(":", 1)[1]] for p in reloaded)


@pytest.mark.slow
def test_image_prompts_keep_their_images(rl_corpus, secret_task, tmp_path, tiny_processor):
    # The format-trained policy ends its responses before the limit: the coin decides, and most groups mix.
    summary = run(
        tmp_path, 4, f"prompts.train={rl_corpus}/grounding/*.tar", f"policy.init_from={secret_task[1]}",
        "rollout.max_new_tokens=24", "reward.fn=tests.rl.user_rewards:coin", "reward.require_reasoning=false",
    )  # fmt: skip
    grounding = json.loads((rl_corpus / "grounding" / "manifest.json").read_text())["samples"]
    assert summary["prompts"] == grounding > 0 and summary["kept"] > 0  # every grounding prompt, once
    reloaded = PromptLoader(PromptsConfig(train=f"{tmp_path}/*.tar"), tiny_processor, max_epochs=1).next_batch(200)
    assert len(reloaded) == summary["kept"] and all(p.images and p.image_size for p in reloaded)
    # Without --save-messages, the output is what it was: no pools anywhere.
    rows = [json.loads(line) for line in (tmp_path / "difficulty.jsonl").read_text().splitlines()]
    assert all(set(row) == {"key", "task", "correct", "scored", "k", "kept"} for row in rows)
    assert all(not p.pool for p in reloaded)
