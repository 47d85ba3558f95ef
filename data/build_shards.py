"""Converts a JSONL file with an image folder, or a saved HF dataset, into webdataset shards.

python data/build_shards.py --jsonl data.jsonl [--image-dir DIR] --out SHARDS/ [--max-samples 1000]
python data/build_shards.py --hf DATASET_DIR [--split train] --out SHARDS/ [--max-bytes 1GB]
    [--tokenizer tiny|DIR] [--processor configs/processor/step3vl.yaml]

Samples follow the schema in docs/data.md. Each is checked and laid out with the processor (which also
counts its tokens for the manifest); a bad one is skipped, counted by reason and logged with its key
(`file.jsonl:LINE`, LINE 1-based, for a JSONL line without a `key`), at most 10 lines a minute and the
rest summed by reason.
Shards are `shard-NNNNNN.tar` beside a `manifest.json` (samples, tokens, images, bytes a shard). The last
line printed is a JSON summary.
"""

import argparse
import json
import logging
from collections import Counter
from collections.abc import Iterator

from tqdm import tqdm

from step3vl_train.data.config import PackingConfig
from step3vl_train.data.encoding import SampleEncoder, image_suffix, sample_record
from step3vl_train.data.schema import Sample
from step3vl_train.data.shards import ShardSetWriter
from step3vl_train.data.skips import SkipLog, SkippedSample
from step3vl_train.data.sources import hf_row_to_sample, load_hf_rows, read_jsonl_shard
from step3vl_train.processing.processor import load_processor


def read_input(args: argparse.Namespace) -> Iterator[Sample | SkippedSample]:
    """The input's samples in their stored order."""
    if args.jsonl:
        for item, _, _ in read_jsonl_shard(args.jsonl, args.image_dir):
            yield item
    else:
        rows = load_hf_rows(args.hf, args.split)
        for index in range(len(rows)):
            yield hf_row_to_sample(f"{args.hf}/{index}", rows[index])


def parse_size(text: str) -> int:
    units = {"KB": 1 << 10, "MB": 1 << 20, "GB": 1 << 30}
    for unit, factor in units.items():
        if text.upper().endswith(unit):
            return int(float(text[: -len(unit)]) * factor)
    return int(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--jsonl")
    source.add_argument("--hf", help="a directory written by datasets' save_to_disk")
    parser.add_argument("--image-dir", help="JSONL images are looked up here (default: beside the file)")
    parser.add_argument("--split", default="train")
    parser.add_argument("--out", required=True)
    parser.add_argument("--prefix", default="shard")
    parser.add_argument("--max-samples", type=int, default=1000, help="samples a shard")
    parser.add_argument("--max-bytes", type=parse_size, default="1GB", help="bytes a shard, e.g. 512MB")
    parser.add_argument("--tokenizer", default="tiny")
    parser.add_argument("--processor", help="processor YAML (default: the released processor)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")

    # No limits here: shards keep whole samples; truncation and image budgets are training-time choices.
    unlimited = PackingConfig(seq_len=1 << 62, max_images_per_pack=1 << 62, max_views_per_pack=1 << 62)
    encoder = SampleEncoder(load_processor(args.tokenizer, args.processor), unlimited)
    writer = ShardSetWriter(args.out, args.prefix, args.max_samples, args.max_bytes)
    skips: Counter = Counter()
    skip_log = SkipLog()
    for item in tqdm(read_input(args), desc="samples", unit="sample", mininterval=2):
        try:
            if isinstance(item, SkippedSample):
                raise item
            tokens = len(encoder.encode(item, "input"))
            suffixes = [image_suffix(item.key, data) for data in item.images]
        except SkippedSample as skip:
            skip_log.record(skip.record("input"))
            skips[skip.reason] += 1
            continue
        writer.write(
            item.key.rsplit(":", 1)[-1].replace("/", "_").replace(".", "_"),
            sample_record(item),
            item.images,
            suffixes,
            tokens,
        )
    skip_log.flush()
    manifest = writer.close()
    print(
        json.dumps(
            {
                **{k: v for k, v in manifest.items() if k != "shards"},
                "shards": len(manifest["shards"]),
                "skipped": dict(skips),
            }
        )
    )


if __name__ == "__main__":
    main()
