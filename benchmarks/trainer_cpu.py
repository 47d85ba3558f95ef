"""Trainer step time against a plain PyTorch loop on the same tiny model and batches, one process (CPU).

python benchmarks/trainer_cpu.py [--steps 20] [--seq-len 1024]

Both run forward, backward, gradient clipping and an AdamW step on the same packed batches (drawn once
from the synthetic corpus, so data loading is not timed). The trainer side is the real path: DeepSpeed
ZeRO-3 on one rank through `backward_global_batch`. Prints the median step time of each and their ratio.
"""

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import deepspeed
import torch
from omegaconf import OmegaConf

from step3vl_train.data.config import DataConfig
from step3vl_train.data.loader import PackedLoader
from step3vl_train.data.synthetic import write_corpus
from step3vl_train.model import Step3VLConfig, Step3VLForConditionalGeneration
from step3vl_train.processing.processor import load_processor
from step3vl_train.train.config import OptimConfig
from step3vl_train.train.engine import build_engine, deepspeed_config
from step3vl_train.train.trainer import backward_global_batch

REPO = Path(__file__).resolve().parents[1]


def batches(count: int, seq_len: int):
    folder = tempfile.mkdtemp()
    write_corpus("pretrain", folder, num=160, seed=0, shard_size=20)
    recipe = OmegaConf.load(REPO / "recipes" / "pretrain.yaml").data
    cfg = DataConfig.from_dict(
        OmegaConf.merge(recipe, {"root": folder, "num_workers": 0, "packing": {"seq_len": seq_len}})
    )
    loader = PackedLoader(cfg, load_processor("tiny", str(REPO / "configs/processor/tiny.yaml")))
    return [packed.batch for packed, _ in zip(loader, range(count), strict=False)]


def timed(step, data) -> float:
    step(data[0])  # warm-up
    times = []
    for batch in data[1:]:
        start = time.perf_counter()
        step(batch)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--seq-len", type=int, default=1024)
    args = parser.parse_args()
    torch.set_num_threads(1)
    os.environ.update(
        {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29533"}
    )
    data = batches(args.steps + 1, args.seq_len)
    config = Step3VLConfig.from_dict(OmegaConf.to_container(OmegaConf.load(REPO / "configs/model/tiny.yaml")))

    torch.manual_seed(0)
    model = Step3VLForConditionalGeneration(config).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.01)

    def plain_step(batch) -> None:
        targets = int((batch.labels[:, 1:] != -100).sum())
        model(**batch.model_inputs(), num_items_in_batch=torch.tensor(targets)).loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    plain = timed(plain_step, data)

    deepspeed.init_distributed(dist_backend="gloo")
    base = OmegaConf.to_container(OmegaConf.load(REPO / "configs/deepspeed/zero3.yaml"))
    ds = build_engine(config, OptimConfig(lr=1e-4), deepspeed_config(base, 1, 1, 1.0, bf16=False))
    ds.engine.train()

    def trainer_step(batch) -> None:
        backward_global_batch(ds.engine, [batch])
        ds.engine.step()

    trainer = timed(trainer_step, data)
    print(
        json.dumps(
            {
                "steps": args.steps,
                "seq_len": args.seq_len,
                "plain_s": round(plain, 4),
                "trainer_s": round(trainer, 4),
                "ratio": round(trainer / plain, 3),
            }
        )
    )


if __name__ == "__main__":
    main()
