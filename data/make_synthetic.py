"""Writes a synthetic corpus with known ground truth as webdataset shards, one folder a task.

python data/make_synthetic.py --kind {pretrain,sft,rl} --out DIR --num N --seed S
    [--shard-size 200] [--tokenizer tiny] [--processor configs/processor/step3vl.yaml]

Tasks take turns (sample i is task i mod #tasks), so N counts samples over all tasks. Each folder gets
`shard-NNNNNN.tar` files and a `manifest.json` (samples, tokens, images a shard); tokens are counted
with the given tokenizer and processor. The last line printed is a JSON summary.
"""

import argparse
import json
import os

from tqdm import tqdm

from step3vl_train.data.shards import ShardSetWriter, encode_image
from step3vl_train.data.synthetic import TASKS, make_sample
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
        return len(processor.layout(record.get("messages"), [image.size for image in images], document=record.get("text")))

    writers = {
        task: ShardSetWriter(os.path.join(args.out, task), max_samples=args.shard_size)
        for task in TASKS[args.kind]
    }
    for index in tqdm(range(args.num), desc=f"synthetic {args.kind}", unit="sample"):
        task, sample = make_sample(args.kind, index, args.seed)
        writer = writers[task]
        writer.count_tokens = lambda record, _images, images=sample.images: count_tokens(record, images)
        suffixes = [sample.image_format] * len(sample.images)
        encoded = [encode_image(image, sample.image_format) for image in sample.images]
        writer.write(f"{task}-{index:08d}", sample.record, encoded, suffixes)
    summary = {task: writer.close() for task, writer in writers.items() if writer.shards}
    print(json.dumps({task: {k: v for k, v in m.items() if k != "shards"} for task, m in summary.items()}))


if __name__ == "__main__":
    main()
