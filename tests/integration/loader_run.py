"""One rank's loader in its own process: N batches, hashed, optionally resumed from and saved to a state file.

python loader_run.py ROOT RANK WORLD BATCHES OUT.json [--load STATE] [--save STATE]
"""

import argparse
import hashlib
import json
import sys
from pathlib import Path

import torch

from step3vl_train.data.config import DataConfig
from step3vl_train.data.loader import PackedLoader
from step3vl_train.processing.processor import load_processor

REPO = Path(__file__).resolve().parents[2]
TASKS = ["text", "caption", "interleaved", "ocr", "grounding", "counting", "chart", "math"]


def batch_digest(packed) -> str:
    digest = hashlib.sha256()
    batch = packed.batch
    pixels = batch.pixels
    for tensor in (batch.input_ids, batch.labels, batch.position_ids, pixels.data if pixels is not None else None):
        if tensor is not None:
            digest.update(tensor.numpy().tobytes())
    layout = [pixels.sources, pixels.windows] if pixels is not None else None
    digest.update(json.dumps([packed.keys, batch.num_patches, layout]).encode())
    return digest.hexdigest()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("root")
    parser.add_argument("rank", type=int)
    parser.add_argument("world", type=int)
    parser.add_argument("batches", type=int)
    parser.add_argument("out")
    parser.add_argument("--load")
    parser.add_argument("--save")
    args = parser.parse_args()
    cfg = DataConfig.from_dict(
        {
            "root": args.root,
            "sources": [{"name": t, "paths": [f"{t}/*.tar"], "weight": 2 if t == "text" else 1} for t in TASKS],
            "num_workers": 2,
            "micro_batch_size": 2,
            "packing": {"seq_len": 1024, "window": 12},
        }
    )
    loader = PackedLoader(cfg, load_processor("tiny", str(REPO / "configs/processor/tiny.yaml")), args.rank, args.world)
    if args.load:
        loader.load_state_dict(torch.load(args.load, weights_only=True))
    digests, keys = [], []
    for packed in loader:
        digests.append(batch_digest(packed))
        keys.append(packed.keys)
        if len(digests) == args.batches:
            break
    if args.save:
        torch.save(loader.state_dict(), args.save)
    Path(args.out).write_text(json.dumps({"digests": digests, "keys": keys, "stats": loader.stats().summary()}))


if __name__ == "__main__":
    sys.exit(main())
