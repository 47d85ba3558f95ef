"""Writes a synthetic corpus with known ground truth as webdataset shards, one folder a task.

python data/make_synthetic.py --kind {pretrain,sft,rl,rlhf,preference} --out DIR --num N --seed S
    [--shard-size 200] [--tokenizer tiny] [--processor configs/processor/step3vl.yaml]

Tasks take turns (sample i is task i mod #tasks), so N counts samples over all tasks. Sample i is drawn
from (S, i) alone: a held-out split is the same command with another --seed. Each folder gets
`shard-NNNNNN.tar` files and a `manifest.json` (samples, tokens, images a shard); tokens are counted
with the given tokenizer and processor. The last line printed is a JSON summary.
"""

import argparse
import json

from step3vl_train.data.synthetic import TASKS, write_corpus
from step3vl_train.processing.processor import load_processor


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kind", choices=sorted(TASKS), required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--num", type=int, required=True, help="samples over all tasks")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--shard-size", type=int, default=200, help="samples a shard")
    parser.add_argument("--tokenizer", default="tiny")
    parser.add_argument("--processor", default=None, help="processor YAML (default: the released processor)")
    args = parser.parse_args()
    processor = load_processor(args.tokenizer, args.processor)

    def count_tokens(record: dict, images: list) -> int:
        sizes = [image.size for image in images]
        return len(processor.layout(record.get("messages"), sizes, document=record.get("text")))

    manifests = write_corpus(args.kind, args.out, args.num, args.seed, args.shard_size, count_tokens, progress=True)
    print(json.dumps({task: {k: v for k, v in m.items() if k != "shards"} for task, m in manifests.items()}))


if __name__ == "__main__":
    main()
