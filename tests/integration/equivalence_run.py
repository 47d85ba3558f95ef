"""Gradients of one global batch under ZeRO-3, split three ways: 4 micro-batches of 1, 1 of 4 rows, and
1 packed row; and the 4 micro-batches again with the vision tower one view a call and the head 3 positions
a call (the ranks then make different numbers of calls). Each split divides its micro-batches' losses by
another fixed count before the gradients are scaled to the global batch's.
torchrun --nproc_per_node 2 equivalence_run.py OUT_DIR

Rank 0 writes OUT_DIR/grads.pt: {split: {parameter name: full gradient}}.
"""

import sys
from pathlib import Path

import deepspeed
import torch
import torch.distributed as dist
from deepspeed.utils import safe_get_full_grad
from omegaconf import OmegaConf
from PIL import Image

from step3vl_train.data.packing import Pack, collate_packs
from step3vl_train.data.stats import DataStats
from step3vl_train.model import Step3VLConfig
from step3vl_train.model.compute import ComputeConfig
from step3vl_train.processing.processor import collate, load_processor
from step3vl_train.train.config import OptimConfig
from step3vl_train.train.distributed import close_distributed
from step3vl_train.train.engine import build_engine, deepspeed_config
from step3vl_train.train.sequence_parallel import data_parallel_rank
from step3vl_train.train.trainer import backward_global_batch
from step3vl_train.train.validation import stand_in_batch

REPO = Path(__file__).resolve().parents[2]


def samples(rank: int):
    """Four conversations of different lengths for this rank, two with an image."""
    processor = load_processor("tiny", str(REPO / "configs/processor/tiny.yaml"))
    photo = Image.open(REPO / "data/samples/chelsea.png").convert("RGB")
    out = []
    for i in range(4):
        images = [photo.resize((200 + 60 * i, 160))] if i % 2 == rank % 2 else []
        content = [{"type": "image"} for _ in images] + [{"type": "text", "text": "word " * (3 + 5 * i + rank)}]
        answer = {"role": "assistant", "content": "answer " * (2 + i), "reasoning_content": "because " * i}
        out.append(processor([{"role": "user", "content": content}, answer], images))
    return out


SPLITS = ("4x1", "1x4", "packed", "4x1-chunked")


def gradients(model_config, split: str, rank: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    four = samples(rank)
    micro = {
        "4x1": [collate([s], 0) for s in four],
        "1x4": [collate(four, 0)],
        "packed": [collate_packs([Pack(four, ["a", "b", "c", "d"], 0, DataStats())], 0).batch],
        "4x1-chunked": [collate([s], 0) for s in four],
    }[split]
    compute = ComputeConfig(vision_chunk=1, loss_chunk=3) if split.endswith("chunked") else ComputeConfig()
    base = OmegaConf.to_container(OmegaConf.load(REPO / "configs/deepspeed/zero3.yaml"))
    ds_config = deepspeed_config(base, 1, len(micro), 0.0, bf16=False)
    ds = build_engine(model_config, OptimConfig(lr=0.0), ds_config, compute=compute)
    ds.engine.train()
    # A different fixed count for each split: the gradients are scaled to the global batch's afterwards.
    reference = {"4x1": 64.0, "1x4": 1.0, "packed": 1000.0, "4x1-chunked": 7.0}[split]
    backward_global_batch(ds.engine, micro, len(micro), data_parallel_rank(1), reference, stand_in_batch(0))
    grads = {name: safe_get_full_grad(param).clone() for name, param in ds.model.named_parameters()}
    ds.engine.destroy()
    return grads


def main() -> None:
    deepspeed.init_distributed(dist_backend="gloo")
    rank = dist.get_rank()
    model_config = Step3VLConfig.from_dict(OmegaConf.to_container(OmegaConf.load(REPO / "configs/model/tiny.yaml")))
    results = {split: gradients(model_config, split, rank) for split in SPLITS}
    if rank == 0:
        torch.save(results, Path(sys.argv[1]) / "grads.pt")
    close_distributed()


if __name__ == "__main__":
    main()
