"""Sequence parallelism (DeepSpeed Ulysses) over 2 gloo ranks against one process with whole rows.

torchrun --nproc_per_node 2 sequence_parallel_run.py OUT_DIR
Both ranks hold the same two packed rows (with images, one split by the slice boundary) as two
micro-batches of one step, each rank running half of each row through the decoder and only the views
its half needs through the tower. Rank 0 then runs the same rows whole through a plain copy of the model
(transformers' own sdpa mask, no chunking) and writes OUT_DIR/result.pt: both losses, both gradients.
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
from step3vl_train.model import Step3VLConfig, Step3VLForConditionalGeneration
from step3vl_train.model.compute import ComputeConfig
from step3vl_train.processing.processor import load_processor
from step3vl_train.train.config import OptimConfig
from step3vl_train.train.distributed import close_distributed
from step3vl_train.train.engine import build_engine, deepspeed_config
from step3vl_train.train.sequence_parallel import data_parallel_rank
from step3vl_train.train.trainer import backward_global_batch, supervised_tokens

REPO = Path(__file__).resolve().parents[2]


def packed_rows():
    """Two packed rows of three conversations each, images of different crop counts among them."""
    processor = load_processor("tiny", str(REPO / "configs/processor/tiny.yaml"))
    photo = Image.open(REPO / "data/samples/chelsea.png").convert("RGB")
    rows = []
    for row in range(2):
        samples = []
        for i in range(3):
            images = [photo.resize((180 + 90 * i + 40 * row, 200))] if (i + row) % 2 == 0 else []
            content = [{"type": "image"} for _ in images] + [{"type": "text", "text": "word " * (4 + 3 * i)}]
            answer = {"role": "assistant", "content": "answer " * (3 + i + row), "reasoning_content": "so " * i}
            samples.append(processor([{"role": "user", "content": content}, answer], images))
        rows.append(collate_packs([Pack(samples, ["a", "b", "c"], 0, DataStats())], 0).batch)
    return rows


def main() -> None:
    deepspeed.init_distributed(dist_backend="gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)
    model_config = Step3VLConfig.from_dict(OmegaConf.to_container(OmegaConf.load(REPO / "configs/model/tiny.yaml")))
    base = OmegaConf.to_container(OmegaConf.load(REPO / "configs/deepspeed/zero3.yaml"))
    compute = ComputeConfig(vision_chunk=1, loss_chunk=5)
    ds = build_engine(
        model_config, OptimConfig(lr=0.0), deepspeed_config(base, 1, 2, 0.0, bf16=False), compute=compute,
        sequence_parallel=2,
    )  # fmt: skip
    assert ds.model.config._attn_implementation == "sdpa_packed"
    ds.engine.train()
    rows = packed_rows()
    calls = []
    ds.model.vision_model.register_forward_hook(lambda _m, args, _o: calls.append(args[0].shape[0]))
    totals = backward_global_batch(ds.engine, rows, data_parallel_rank(2)).tolist()
    grads = {name: safe_get_full_grad(param).clone() for name, param in ds.model.named_parameters()}
    params = {}
    for name, param in ds.model.named_parameters():
        with deepspeed.zero.GatheredParameters([param]):
            params[name] = param.detach().clone()
    if rank == 0:
        plain = Step3VLForConditionalGeneration(model_config).train()
        plain.load_state_dict(params)
        targets = sum(supervised_tokens(row) for row in rows)
        loss = 0.0
        for row in rows:
            part = plain(**row.model_inputs(), num_items_in_batch=targets).loss
            part.backward()
            loss += float(part)
        reference = {name: param.grad for name, param in plain.named_parameters()}
        result = {
            "sp": (totals, grads),
            "whole": ([loss, targets], reference),
            "vision_calls": calls,
            "engine": (ds.engine.sequence_parallel_size, ds.engine.dp_world_size, ds.engine.seq_dp_world_size),
        }
        torch.save(result, Path(sys.argv[1]) / "result.pt")
    close_distributed()


if __name__ == "__main__":
    main()
