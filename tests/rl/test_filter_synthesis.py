"""data/filter_synthesis.py rolls out each prompt's PaCoRe synthesis round k times, all with one draw of
messages from its pool, and keeps the prompts solved sometimes but not always, with their pools."""

import json
import os
import subprocess
import sys

import pytest

from rl.config import PromptsConfig
from rl.pacore.config import PaCoReConfig
from rl.prompts import PromptLoader
from step3vl_train.data.shards import ShardSetWriter
from tests.conftest import REPO
from tests.rl.format_task import QUESTION, SECRET

TOOL = [sys.executable, str(REPO / "data" / "filter_synthesis.py")]
PACORE = {"messages": [2, 4], "max_message_tokens": 64, "max_synthesis_tokens": 1536}
TINY = ["stage=pacore", "model=tiny", "processor=tiny", "tokenizer=tiny", "rollout.max_new_tokens=24"]
TINY += [f"pacore.{name}={json.dumps(value).replace(' ', '')}" for name, value in PACORE.items()]


def short(key):
    """A prompt's key without its shard's path."""
    return key.rsplit(":", 1)[1]


def entry(digit, finished=True, reward="auto"):
    reward = float(str(digit) == SECRET) if reward == "auto" else reward
    status = "ok" if reward is not None else "timeout"
    return {"text": f"\\boxed{{{digit}}}", "finished": finished, "reward": reward, "status": status, "model": "m"}


def write_pools(out, num):
    """`num` secret-digit prompts with pools of 6 (mostly the right answer, one unfinished, one unscored);
    and two prompts that no synthesis may be given messages: no pool, and only unfinished entries."""
    writer = ShardSetWriter(str(out), max_samples=8)
    problem = {"messages": [{"role": "user", "content": QUESTION}], "answer": SECRET, "reward": "math"}
    for index in range(num):
        pool = [entry(7), entry(7), entry(index % 10), entry(7, finished=False), entry(3), entry(7, reward=None)]
        writer.write(f"pool-{index:04d}", problem | {"pool": pool}, [], [])
    writer.write("no-pool", problem, [], [])
    writer.write("unfinished", problem | {"pool": [entry(7, finished=False)] * 3}, [], [])
    writer.close()
    return out


@pytest.mark.slow
def test_keeps_sometimes_solved_syntheses_with_their_pools(secret_task, tmp_path, tiny_processor):
    pools = write_pools(tmp_path / "pools", 24)
    out = tmp_path / "out"
    command = [*TOOL, "--k", "4", "--out", str(out), "--", *TINY, f"prompts.root={pools}",
               f"policy.init_from={secret_task[1]}", "reward.fn=tests.rl.user_rewards:coin",
               "reward.require_reasoning=false"]  # fmt: skip
    done = subprocess.run(
        command, capture_output=True, text=True, timeout=600, env={**os.environ, "PYTHONPATH": str(REPO)}
    )
    assert done.returncode == 0, done.stderr[-4000:]
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    rows = [json.loads(line) for line in (out / "synthesis.jsonl").read_text().splitlines()]

    # Counts: every prompt with messages once; the two without any skipped and counted.
    assert summary["prompts"] == len(rows) == 24 and summary["skipped"] == {"no_messages": 2}
    kept = [row for row in rows if row["kept"]]
    assert all(0 < row["correct"] < row["scored"] == 4 for row in kept)
    assert all(row["correct"] in (0, row["scored"]) for row in rows if not row["kept"])
    assert 0 < summary["kept"] == len(kept) < 24  # the coin: most groups mix, some do not
    assert summary["synthesis_accuracy"] == sum(r["correct"] for r in rows) / sum(r["scored"] for r in rows)

    # The messages given: 2-4 finished, scored or not, never the unfinished entry (index 3); their reward.
    for row in rows:
        assert 2 <= len(row["messages"]) <= 4 and 3 not in row["messages"] and row["dropped"] == {}
        index = int(row["key"].rsplit("-", 1)[1])
        rewards = [[1.0, 1.0, float(index % 10 == 7), None, 0.0, None][i] for i in row["messages"]]
        scored = [r for r in rewards if r is not None]
        assert row["message_reward"] == (sum(scored) / len(scored) if scored else None)

    # Draws are seeded by (pacore.seed, step, the sample's own key): the kept shards, read from another
    # folder, draw at step 0 the messages they were filtered with; another seed draws others.
    for seed, same in ((0, True), (1, False)):
        pacore = PaCoReConfig(**PACORE, seed=seed)
        loader = PromptLoader(PromptsConfig(train=f"{out}/*.tar"), tiny_processor, max_epochs=1, pacore=pacore)
        drawn = {short(p.key): p.synthesis.indices for p in loader.next_batch(100, step=0)}
        assert ({short(row["key"]): row["messages"] for row in kept} == drawn) is same

    # Kept prompts are written as the problem (not its synthesis round) with their whole pool.
    config = PromptsConfig(train=f"{out}/*.tar")
    reloaded = PromptLoader(config, tiny_processor, max_epochs=1, keep_pools=True).next_batch(100)
    assert sorted(short(p.key) for p in reloaded) == sorted(short(row["key"]) for row in kept)
    for prompt in reloaded:
        index = int(prompt.key.rsplit("-", 1)[1])
        assert prompt.messages == [{"role": "user", "content": QUESTION}] and prompt.answer == SECRET
        assert len(prompt.pool) == 6 and prompt.pool[2]["text"] == f"\\boxed{{{index % 10}}}"
