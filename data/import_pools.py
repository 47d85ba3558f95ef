"""Imports message pools in the released PaCoRe-Train-8k layout (stepfun-ai/PaCoRe-Train-8k) as prompt
shards with a `pool`, the prompts `stage=pacore` and data/filter_synthesis.py read.

python data/import_pools.py --dataset PATH --out DIR [--reward math] [--model NAME] [--split train]

PATH is local (nothing is downloaded): a directory written by `datasets`' save_to_disk (a DatasetDict's
`--split`), a .json file (a list of entries, or one entry a line), a .jsonl or a .parquet file, or a
directory holding such files (read in sorted order, subdirectories included). The release's README links
two subsets, Stage1-3k and Stage2-5k (the paper's two curriculum stages, spec 6.4): import each from its
own folder if you mean to train on one.

The layout, as the PaCoRe README describes it (stepfun-ai/PaCoRe @ 98e846f, "Data"): each entry has
`conversation`, the problem's chat messages; `responses`, the cached trajectories (strings) the paper
trained with as messages M; `ground_truth`, the verifiable answer. We have not seen the files themselves:
the types below are what this adapter accepts, not a confirmed description of the release.
- `conversation`: a list of {"role", "content"} messages ending with a user turn (or that list as a JSON
  string); only `role` and `content` are kept.
- `responses`: a list of strings; an entry that is not a string is left out of the pool and counted.
- `ground_truth`: the sample's `answer`, as it is; {"answer": X} (the layout of the PaCoRe repository's
  playground questions) becomes X.

Each response becomes a pool entry: its conclusion (the text after its last `</think>`; all of it without
one), `finished` when it has a `</think>`, `reward` null and status `unscored` (the layout has no per-response
reward; data/filter_synthesis.py scores the synthesis, not the messages), and `model` (by default the
dataset's name: the paper's cache pool was written by its RLVR-8B (spec 6.4), but the layout does not say
which checkpoint wrote a response). If the responses hold no `</think>` (answers only), no entry is
finished and PaCoRe draws none unless pacore.keep_unfinished=true; the summary counts them.

An entry that cannot be used (a line that is not a JSON object, no conversation ending with a user turn,
no ground truth, responses not a list, no response at all) is skipped, counted by reason and logged with its
key, never a crash. Samples are keyed `pacore-NNNNNNN` (the entry's position in the dataset), their `source`
naming the file (or split) and row. The last line printed is a JSON summary.
"""

from __future__ import annotations

import argparse
import json
import logging
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from rl.pacore.messages import pool_entry
from step3vl_train.data.schema import build_sample
from step3vl_train.data.shards import ShardSetWriter
from step3vl_train.data.skips import SkipLog, SkippedSample
from step3vl_train.processing.chat import THINK_END

DEFAULT_MODEL = "stepfun-ai/PaCoRe-Train-8k"
FILE_SUFFIXES = (".json", ".jsonl", ".parquet")


def read_entries(path: Path, split: str) -> Iterator[tuple[str, Any]]:
    """(where, entry) for every entry of the dataset at `path`, in order; `where` names its file and row.
    An entry is a dict, or the text of a line that did not parse."""
    if not path.exists():
        raise SystemExit(f"import_pools.py: --dataset {path}: no such file or directory")
    if path.is_dir() and any((path / name).is_file() for name in ("dataset_info.json", "dataset_dict.json")):
        import datasets

        loaded = datasets.load_from_disk(str(path))
        if isinstance(loaded, datasets.DatasetDict) and split not in loaded:
            raise SystemExit(f"import_pools.py: --dataset {path} has splits {list(loaded)}, not --split {split}")
        rows = loaded[split] if isinstance(loaded, datasets.DatasetDict) else loaded
        for index, row in enumerate(rows):
            yield f"{path.name}/{split}:{index}", row
        return
    files = sorted(p for p in path.rglob("*") if p.suffix in FILE_SUFFIXES) if path.is_dir() else [path]
    if not files:
        raise SystemExit(f"import_pools.py: --dataset {path}: no saved dataset and no {FILE_SUFFIXES} files")
    for file in files:
        name = f"{path.name}/{file.relative_to(path)}" if path.is_dir() else file.name
        for index, entry in enumerate(read_file(file)):
            yield f"{name}:{index}", entry


def read_file(file: Path) -> Iterator[Any]:
    if file.suffix == ".parquet":
        import pyarrow.parquet as pq

        yield from pq.read_table(file).to_pylist()
        return
    text = file.read_text()
    if file.suffix == ".json":
        try:
            whole = json.loads(text)
        except json.JSONDecodeError:
            whole = None  # one entry a line, then
        if isinstance(whole, list):
            yield from whole
            return
        if isinstance(whole, dict):
            yield whole
            return
    for line in text.splitlines():
        if line.strip():
            try:
                yield json.loads(line)
            except json.JSONDecodeError:
                yield line


def conversation_of(key: str, entry: dict[str, Any]) -> list[dict[str, Any]]:
    conversation = entry.get("conversation")
    if isinstance(conversation, str):
        try:
            conversation = json.loads(conversation)
        except json.JSONDecodeError as error:
            raise SkippedSample("malformed_json", key, f"conversation: {error}") from error
    if not isinstance(conversation, list) or not conversation:
        raise SkippedSample("bad_schema", key, "'conversation' must be a non-empty list of messages")
    if not all(isinstance(m, dict) for m in conversation) or conversation[-1].get("role") != "user":
        raise SkippedSample("bad_schema", key, "'conversation' must be messages ending with a user turn")
    return [{"role": m.get("role"), "content": m.get("content")} for m in conversation]


def convert(key: str, where: str, entry: Any, reward: str, model: str, counts: Counter[str]) -> dict[str, Any]:
    """An entry as a sample record (checked against the schema); `counts` gains its responses' tallies."""
    if not isinstance(entry, dict):
        raise SkippedSample("malformed_json", key, f"{where}: not a JSON object")
    messages = conversation_of(key, entry)
    answer = entry.get("ground_truth")
    if isinstance(answer, dict) and set(answer) == {"answer"}:
        answer = answer["answer"]
    if answer is None or answer == "":
        raise SkippedSample("bad_schema", key, "no 'ground_truth'")
    responses = entry.get("responses")
    if not isinstance(responses, list):
        raise SkippedSample("bad_schema", key, "'responses' must be a list of strings")
    texts = [r for r in responses if isinstance(r, str)]
    if not texts:
        raise SkippedSample("no_messages", key, f"none of its {len(responses)} responses is a string")
    record = {"messages": messages, "answer": answer, "reward": reward, "source": where}
    record["pool"] = [pool_entry(text, model) for text in texts]  # unscored: the layout has no rewards
    build_sample(key, record, {})  # a skip here leaves the tallies below alone
    counts["responses"] += len(texts)
    counts["not_a_string"] += len(responses) - len(texts)
    counts["unfinished"] += sum(THINK_END not in text for text in texts)
    return record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", required=True, help="a local dataset in the PaCoRe-Train-8k layout")
    parser.add_argument("--out", required=True)
    parser.add_argument("--reward", default="math", help="the verifier that scores the synthesis (`reward`)")
    parser.add_argument("--model", default=DEFAULT_MODEL, help="the pool entries' `model`")
    parser.add_argument("--split", default="train", help="a saved DatasetDict's split")
    parser.add_argument("--max-samples", type=int, default=1000, help="samples a shard")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    writer = ShardSetWriter(args.out, max_samples=args.max_samples)
    skips, counts, skip_log, entries = Counter(), Counter(), SkipLog(), 0
    for index, (where, entry) in enumerate(read_entries(Path(args.dataset), args.split)):
        key = f"pacore-{index:07d}"
        entries += 1
        try:
            record = convert(key, where, entry, args.reward, args.model, counts)
        except SkippedSample as skip:
            skip_log.record(skip.record(where))
            skips[skip.reason] += 1
            continue
        writer.write(key, record, [], [])
    skip_log.flush()
    manifest = writer.close()
    summary = {"entries": entries, "samples": manifest["samples"], "skipped": dict(skips)}
    summary |= {"responses": counts["responses"], "unfinished": counts["unfinished"]}
    summary["responses_left_out"] = counts["not_a_string"]
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
