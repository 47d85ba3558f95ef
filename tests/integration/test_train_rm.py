"""launch/train_rm.py +recipe=rm +cpu=rm over 2 ranks of ZeRO-3 on the CPU (gloo), on synthetic preference
pairs: it learns the preference on held-out pairs, and its export loads and scores as the service will."""

import json
import subprocess
import sys

import pytest

from step3vl_train.data.synthetic import write_corpus
from tests.conftest import REPO
from tests.integration.test_pretrain import environment


@pytest.mark.slow
def test_a_reward_model_learns_the_preference_and_its_export_scores_it(tmp_path, tiny_processor):
    from step3vl_train.data.sources import read_tar_shard
    from step3vl_train.processing.images import load_image
    from step3vl_train.train.reward_model import load_reward_model, reward_conversation, score_samples

    root = tmp_path / "preference"
    write_corpus("preference", str(root), num=800, seed=0, shard_size=100)
    write_corpus("preference", str(root / "heldout"), num=200, seed=1, shard_size=50)  # another seed: unseen pairs
    out = tmp_path / "rm"
    trained = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", str(REPO / "launch" / "train_rm.py"),
         "+recipe=rm", "+cpu=rm", f"data.root={root}", f"trainer.output_dir={out}", "logging.mode=disabled"],
        capture_output=True, text=True, timeout=300, env=environment(),
    )  # fmt: skip
    assert trained.returncode == 0, trained.stderr[-4000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == list(range(1, 41))
    assert all({"loss", "accuracy", "margin", "reward_mean", "reward_std", "lr", "grad_norm", "samples"} <= set(row)
               for row in rows)  # fmt: skip
    evaluated = [row for row in rows if "eval/accuracy" in row]
    assert [row["step"] for row in evaluated] == [20, 40] and evaluated[-1]["eval/pairs"] == 200
    assert evaluated[-1]["eval/accuracy"] >= 0.95, evaluated
    assert rows[-1]["loss"] < rows[0]["loss"] and rows[0]["samples"] == 16

    exported = subprocess.run(
        [sys.executable, str(REPO / "launch" / "export_hf.py"), f"checkpoint={out}", f"out={tmp_path / 'rm_hf'}"],
        capture_output=True, text=True, timeout=300, env=environment(),
    )  # fmt: skip
    assert exported.returncode == 0, exported.stderr[-4000:]
    stats_file = json.loads((tmp_path / "rm_hf" / "reward_stats.json").read_text())
    assert stats_file["from"] == "eval" and stats_file["step"] == 40 and stats_file["pairs"] == 200
    assert stats_file["mean"] == pytest.approx(evaluated[-1]["eval/reward_mean"])
    assert stats_file["std"] == pytest.approx(evaluated[-1]["eval/reward_std"]) and stats_file["std"] > 0

    model, stats = load_reward_model(tmp_path / "rm_hf")
    assert stats.std == stats_file["std"] and not model.training
    pairs = [sample for sample, _, _ in read_tar_shard(str(root / "heldout" / "pairs" / "shard-000000.tar"))][:8]
    pad = tiny_processor.tokenizer.pad_token_id

    def score(side):
        rows = [
            tiny_processor(reward_conversation(s.messages, getattr(s, side)), [load_image(d) for d in s.images])
            for s in pairs
        ]
        return score_samples(model, rows, pad)

    scores = {side: score(side) for side in ("chosen", "rejected")}
    assert all(c > r for c, r in zip(scores["chosen"], scores["rejected"], strict=True)), scores
