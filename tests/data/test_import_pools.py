"""data/import_pools.py: pools in the released PaCoRe-Train-8k layout become prompt shards with a `pool`
that the schema, the RL prompt loader and its PaCoRe draws accept; a malformed entry is a counted skip."""

import json
import subprocess
import sys

from rl.config import PromptsConfig
from rl.pacore.config import PaCoReConfig
from rl.prompts import PromptLoader
from step3vl_train.data.sources import read_tar_shard
from tests.conftest import REPO

TOOL = [sys.executable, str(REPO / "data" / "import_pools.py")]


def entry(question, answer, responses, last_role="user"):
    conversation = [{"role": "system", "content": "Reason, then answer."}, {"role": last_role, "content": question}]
    return {"conversation": conversation, "responses": responses, "ground_truth": answer}


ENTRIES = [
    entry("What is 2+3?", "5", ["Add them.</think>\\boxed{5}", "Hm.</think>\\boxed{6}", "cut off while thin"]),
    entry("What is 4*4?", "16", ["Square.</think>The answer is \\boxed{16}"]),
    entry("Tell me 1+1.", "2", ["x</think>2"], last_role="assistant"),  # malformed: no user turn to answer
    entry("What is 9-1?", "8", ["a</think>b</think>\\boxed{8}", "</think>"]),
]


def import_pools(dataset, out, *flags):
    done = subprocess.run([*TOOL, "--dataset", dataset, "--out", out, *flags], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout.strip().splitlines()[-1]), done.stderr


def test_a_saved_dataset_becomes_pools(tmp_path, tiny_processor):
    import datasets

    datasets.DatasetDict({"train": datasets.Dataset.from_list(ENTRIES)}).save_to_disk(str(tmp_path / "pacore"))
    summary, log = import_pools(tmp_path / "pacore", tmp_path / "out", "--model", "rlvr-8b")
    assert summary == {"entries": 4, "samples": 3, "skipped": {"bad_schema": 1}, "responses": 6,
                       "unfinished": 1, "responses_left_out": 0}  # fmt: skip
    assert "pacore-0000002" in log and "user turn" in log  # the skip names its key and why

    config = PromptsConfig(train=f"{tmp_path}/out/*.tar")
    prompts = PromptLoader(config, tiny_processor, max_epochs=1, keep_pools=True).next_batch(9)
    assert [p.key.rsplit(":", 1)[1] for p in prompts] == ["pacore-0000000", "pacore-0000001", "pacore-0000003"]
    first, _, last = prompts
    assert first.messages == ENTRIES[0]["conversation"] and first.answer == "5" and first.reward == "math"
    assert first.pool == [
        {"text": "\\boxed{5}", "finished": True, "reward": None, "status": "unscored", "model": "rlvr-8b"},
        {"text": "\\boxed{6}", "finished": True, "reward": None, "status": "unscored", "model": "rlvr-8b"},
        {"text": "cut off while thin", "finished": False, "reward": None, "status": "unscored", "model": "rlvr-8b"},
    ]
    assert [e["text"] for e in last.pool] == ["\\boxed{8}", ""]  # after the last </think>

    # As stage=pacore reads them: only finished, non-empty conclusions are given to the synthesis.
    pacore = PaCoReConfig(messages=[3, 3])
    loader = PromptLoader(PromptsConfig(train=f"{tmp_path}/out/*.tar"), tiny_processor, max_epochs=1, pacore=pacore)
    synthesis = {p.key.rsplit(":", 1)[1]: p for p in loader.next_batch(9)}
    assert sorted(synthesis["pacore-0000000"].synthesis.indices) == [0, 1]
    assert synthesis["pacore-0000003"].synthesis.indices == [0]
    assert "Reference 1:" in synthesis["pacore-0000000"].messages[-1]["content"]
    assert synthesis["pacore-0000000"].original_messages == ENTRIES[0]["conversation"]


def test_json_lines_with_broken_entries(tmp_path):
    lines = [
        json.dumps({**ENTRIES[1], "ground_truth": {"answer": "16"}}),  # the PaCoRe playground's answer layout
        "{not json",
        json.dumps({**ENTRIES[0], "responses": "one string, not a list"}),
        json.dumps({**ENTRIES[0], "responses": [None, 3]}),
        json.dumps({**ENTRIES[0], "ground_truth": None}),
        json.dumps({**ENTRIES[0], "responses": ["ok</think>\\boxed{5}", None]}),
        json.dumps([1, 2]),
    ]
    (tmp_path / "pools.jsonl").write_text("\n".join(lines) + "\n")
    summary, _ = import_pools(tmp_path / "pools.jsonl", tmp_path / "out", "--reward", "numeric")
    assert summary == {"entries": 7, "samples": 2, "skipped": {"malformed_json": 2, "bad_schema": 2, "no_messages": 1},
                       "responses": 2, "unfinished": 0, "responses_left_out": 1}  # fmt: skip
    samples = [item for path in sorted((tmp_path / "out").glob("*.tar")) for item, _, _ in read_tar_shard(str(path))]
    assert [(s.answer, s.reward, len(s.pool)) for s in samples] == [("16", "numeric", 1), ("5", "numeric", 1)]
    assert [s.source for s in samples] == ["pools.jsonl:0", "pools.jsonl:5"]
