"""Runs the data loader and reports what it delivers; also the data pipeline's benchmark.

python data/inspect_data.py configs/data/synthetic_pretrain.yaml [data.key=value ...]
python data/inspect_data.py recipes/sft_stage1.yaml data.root=outputs/synthetic/sft
python data/inspect_data.py recipes/pretrain.yaml --phase phase2 data.root=outputs/synthetic/pretrain
python data/inspect_data.py 'shards/train-{000000..000009}.tar' [--seq-len 4096] [--workers 2]

A YAML is a data config, or a recipe (its `data:` block is used; `--phase NAME`, one of its `phases`,
takes that phase's mixture weights, a source it leaves out not read); anything else is read as shard
paths of one webdataset source. Shows samples/s, tokens/s, packing efficiency and skips as it goes; then
prints each source's realised token share beside its target (its weight, normalised), each skip reason's
distinct samples and encounters, and, last, one line holding all of them as a JSON object (`share/` and
`target/<source>`, `skipped/` encounters and `skipped_unique/<reason>` distinct samples).
"""

import argparse
import json
import logging
import time

from omegaconf import OmegaConf
from tqdm import tqdm

from step3vl_train.data.config import DataConfig
from step3vl_train.data.loader import PackedLoader
from step3vl_train.data.mixture import TokenMixture
from step3vl_train.processing.processor import load_processor


def data_config(inputs: list[str], overrides: list[str], args: argparse.Namespace) -> DataConfig:
    if len(inputs) == 1 and inputs[0].endswith((".yaml", ".yml")):
        loaded = OmegaConf.load(inputs[0])
        values = loaded.data if "data" in loaded else loaded
        if args.phase:
            weights = loaded.phases[args.phase].weights
            values.sources = [{**s, "weight": weights[s.name]} for s in values.sources if weights.get(s.name, 0) > 0]
    else:
        values = OmegaConf.create({"sources": [{"name": "shards", "paths": inputs}]})
    cli = OmegaConf.from_dotlist([o.removeprefix("data.") for o in overrides])
    flags = {"num_workers": args.workers, "max_epochs": args.epochs, "packing": {"seq_len": args.seq_len}}
    flags = OmegaConf.create({k: v for k, v in flags.items() if v is not None and v != {"seq_len": None}})
    return DataConfig.from_dict(OmegaConf.merge(values, flags, cli))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("inputs", nargs="+", help="a data config or recipe YAML, or shard paths; then data.key=value")
    parser.add_argument("--phase", help="a later phase of the recipe (a `phases` key): its mixture")
    parser.add_argument("--seq-len", type=int)
    parser.add_argument("--workers", type=int)
    parser.add_argument("--epochs", type=int, default=1, help="passes over each source (0: forever)")
    parser.add_argument("--batches", type=int, help="stop after this many batches")
    parser.add_argument("--tokenizer", default="tiny")
    parser.add_argument("--processor", help="processor YAML (default: the released processor)")
    parser.add_argument("--quiet", action="store_true", help="do not log each skipped sample")
    args = parser.parse_intermixed_args()  # data.key=value before or after the flags
    args.epochs = args.epochs or None
    inputs = [a for a in args.inputs if "=" not in a]
    overrides = [a for a in args.inputs if "=" in a]
    logging.basicConfig(level=logging.ERROR if args.quiet else logging.WARNING, format="%(levelname)s %(message)s")

    cfg = data_config(inputs, overrides, args)
    loader = PackedLoader(cfg, load_processor(args.tokenizer, args.processor))
    start = time.perf_counter()
    batches = 0
    progress = tqdm(loader, desc="batches", unit="batch", total=args.batches, mininterval=2)
    for _ in progress:
        batches += 1
        stats = loader.stats()
        progress.set_postfix(
            tokens=stats.tokens, eff=f"{stats.packing_efficiency:.3f}", skipped=sum(stats.skips.values())
        )
        if args.batches and batches >= args.batches:
            break
    elapsed = time.perf_counter() - start
    stats = loader.stats()
    targets = TokenMixture([s.name for s in cfg.sources], [s.weight for s in cfg.sources]).targets
    report = {
        "batches": batches,
        "seconds": round(elapsed, 2),
        "samples_per_s": round(stats.samples / elapsed, 1),
        "tokens_per_s": round(stats.tokens / elapsed, 1),
        "images_per_s": round(stats.images / elapsed, 2),
        "views_per_s": round(stats.views / elapsed, 2),
        **stats.summary(),
        **{f"target/{name}": round(share, 4) for name, share in targets.items()},
    }
    for name, target in targets.items():
        print(f"source {name}: {report.get(f'share/{name}', 0.0):.4f} of tokens (target {target:.4f})")
    for reason, count in sorted(stats.skips.items()):
        print(f"skipped {stats.skipped_unique[reason]} distinct, met {count} times ({reason})")
    print(json.dumps(report))


if __name__ == "__main__":
    main()
