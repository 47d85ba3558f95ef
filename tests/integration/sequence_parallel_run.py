"""Sequence parallelism (DeepSpeed Ulysses) over 2 gloo ranks against one process with whole rows.

torchrun --nproc_per_node 2 sequence_parallel_run.py OUT_DIR
Both ranks hold the same two packed rows (with images, one split by the slice boundary) as two
micro-batches of one step, each rank running half of each row through the decoder and holding only the
views its half needs (`slice_views`); once with DeepSpeed's default gradient reduce, once with
`reduce_scatter` and `contiguous_gradients` off. Rank 0 then runs the same rows whole through a plain copy
of the model (transformers' own sdpa mask, no chunking) and writes OUT_DIR/result.pt: the losses and
gradients of each.
"""

import sys
from pathlib import Path

import deepspeed
import torch
import torch.distributed as dist
from deepspeed.runtime.sequence_parallel import parallel_state_sp
from deepspeed.utils import safe_get_full_grad
from omegaconf import OmegaConf
from PIL import Image
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from step3vl_train.data.packing import Pack, collate_packs
from step3vl_train.data.stats import DataStats
from step3vl_train.model import Step3VLConfig, Step3VLForConditionalGeneration
from step3vl_train.model.compute import ComputeConfig
from step3vl_train.processing.processor import load_processor
from step3vl_train.train.config import OptimConfig
from step3vl_train.train.distributed import close_distributed
from step3vl_train.train.engine import build_engine, deepspeed_config, gathered_parameters
from step3vl_train.train.sequence_parallel import data_parallel_rank, slice_views
from step3vl_train.train.trainer import backward_global_batch, supervised_tokens
from step3vl_train.train.validation import stand_in_batch

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


def sequence_parallel_gradients(model_config, rows, zero: dict):
    """The step's sums and the views this rank held, and the full gradients, each rank running half of each
    row, under `zero` settings."""
    torch.manual_seed(0)
    base = OmegaConf.to_container(OmegaConf.load(REPO / "configs/deepspeed/zero3.yaml"))
    base["zero_optimization"] |= zero
    compute = ComputeConfig(vision_chunk=1, loss_chunk=5)
    ds = build_engine(
        model_config, OptimConfig(lr=0.0), deepspeed_config(base, 1, 2, 0.0, bf16=False), compute=compute,
        sequence_parallel=2,
    )  # fmt: skip
    assert ds.model.config._attn_implementation == "sdpa_packed"
    ds.engine.train()
    # Each rank holds only the views its half needs, as the trainer's GroupLoader hands them out.
    rank, image_token = dist.get_rank(), model_config.image_token_id
    rows = [slice_views(row, rank, 2, image_token, ds.model.tokens_per_view) for row in rows]
    views = sum(len(row.pixels.sources) + row.pixels.num_crops for row in rows)
    totals = backward_global_batch(ds.engine, rows, len(rows), data_parallel_rank(2), 50.0, stand_in_batch(0))
    grads = {name: safe_get_full_grad(param).clone() for name, param in ds.model.named_parameters()}
    return ds, totals.tolist() + [views], grads


def main() -> None:
    deepspeed.init_distributed(dist_backend="gloo")
    rank = dist.get_rank()
    model_config = Step3VLConfig.from_dict(OmegaConf.to_container(OmegaConf.load(REPO / "configs/model/tiny.yaml")))
    rows = packed_rows()
    results = {}
    # DeepSpeed averages gradients by a reduce-scatter over the world (the default), or, here, with both
    # settings off, the same way tensor by tensor (engine.check_gradient_reduce refuses the mixed one).
    settings = {"reduce_scatter": {}, "no_reduce_scatter": {"reduce_scatter": False, "contiguous_gradients": False}}
    kernel = ALL_ATTENTION_FUNCTIONS["sdpa_packed"]
    for name, zero in settings.items():
        # One process, two engines: Ulysses' groups and its wrapper of the kernel made anew for the second.
        parallel_state_sp._release_sequence_parallel_groups()
        ALL_ATTENTION_FUNCTIONS["sdpa_packed"] = kernel
        ds, totals, grads = sequence_parallel_gradients(model_config, rows, zero)
        results[name] = (totals, grads)
        engine = (ds.engine.sequence_parallel_size, ds.engine.dp_world_size, ds.engine.seq_dp_world_size)
    params = {}
    for name, param in ds.model.named_parameters():
        with gathered_parameters([param]):
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
        views = sum(len(row.pixels.sources) + row.pixels.num_crops for row in rows)
        result = {**results, "whole": ([loss, targets], reference), "engine": engine, "views": views}
        torch.save(result, Path(sys.argv[1]) / "result.pt")
    close_distributed()


if __name__ == "__main__":
    main()
