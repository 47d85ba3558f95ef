"""One rank of a bf16 ZeRO-3 run on the CPU whose ranks hold different kinds of batch at every step.

torchrun --nproc_per_node 2 zero3_run.py OUT_DIR STEPS
Each rank writes OUT_DIR/rank{R}.json: its losses, how far the vision weights moved, the dtypes
DeepSpeed accumulates and reduces gradients in, what ZeRO-3 keeps whole, the all-gathers of each
micro-step, and a validation's sums (train/validation.py: `evaluate`) over batches of two sources that
differ between the ranks in number and kind, with the same sums taken by every rank over all of those
batches. Rank 0's stdout holds DeepSpeed's "Invalidate trace cache" lines between "steady state from
here" and "steady state ends".
"""

import json
import sys
from contextlib import contextmanager
from pathlib import Path

import deepspeed
import torch
from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus
from deepspeed.utils import safe_get_local_grad
from omegaconf import OmegaConf
from PIL import Image

from step3vl_train.model import Step3VLConfig
from step3vl_train.processing.processor import collate, load_processor
from step3vl_train.train.config import OptimConfig
from step3vl_train.train.distributed import close_distributed
from step3vl_train.train.engine import build_engine, deepspeed_config, gathered_parameters
from step3vl_train.train.validation import SourceBatch, evaluate, stand_in_batch

REPO = Path(__file__).resolve().parents[2]


def batches(processor):
    """Text only; an image with crops and its global view; a small image with a global view only."""
    photo = Image.open(REPO / "data" / "samples" / "chelsea.png").convert("RGB")
    answer = {"role": "assistant", "content": "A cat."}

    def ask(*images):
        content = [{"type": "image"} for _ in images] + [{"type": "text", "text": "What is it?"}]
        return collate([processor([{"role": "user", "content": content}, answer], list(images))], 0)

    return [ask(), ask(photo), ask(photo.resize((120, 100)))]


def main() -> None:
    out, steps = Path(sys.argv[1]), int(sys.argv[2])
    deepspeed.init_distributed(dist_backend="gloo")
    rank = torch.distributed.get_rank()
    torch.manual_seed(0)
    model_config = Step3VLConfig.from_dict(OmegaConf.to_container(OmegaConf.load(REPO / "configs/model/tiny.yaml")))
    base = OmegaConf.to_container(OmegaConf.load(REPO / "configs/deepspeed/zero3.yaml"))
    base["zero_optimization"]["log_trace_cache_warnings"] = True  # "Invalidate trace cache" on stdout
    ds = build_engine(model_config, OptimConfig(lr=1e-3), deepspeed_config(base, 1, 1, 1.0, bf16=True))
    ds.model.gradient_checkpointing_enable()
    persistent = {id(param) for param in ds.engine.optimizer.persistent_parameters}
    kept = [param for module in ds.model.kept_whole() for param in module.parameters()]
    hooked = [m for module in ds.model.kept_whole() for m in module.modules() if m._forward_pre_hooks]
    conv = ds.model.vision_model.conv1.weight
    with gathered_parameters([conv]):
        before = conv.detach().clone()
    kinds = batches(load_processor("tiny", str(REPO / "configs/processor/tiny.yaml")))
    losses, gathers = [], []
    for step in range(steps):
        if step == WARM_UP and rank == 0:  # DeepSpeed prints its invalidations on rank 0
            print("steady state from here", flush=True)
        batch = kinds[(step + rank) % len(kinds)]  # the ranks never hold the same kind at once
        with counted_gathers() as gathered:
            loss = ds.engine(**batch.model_inputs(pixel_dtype=torch.bfloat16)).loss
            ds.engine.backward(loss)
        gathers.append(gathered[0])
        ds.engine.step()
        losses.append(loss.item())
    if rank == 0:
        print("steady state ends", flush=True)
    with gathered_parameters([conv]):
        moved = (conv.detach() - before).abs().max().item()
        before_text = conv.detach().clone()
    # A step whose every rank holds text alone makes no call of the tower. Its gradients are exact zeros,
    # not the last step's, which DeepSpeed would keep; AdamW still moves its weights (their momentum).
    calls = []
    hook = ds.model.vision_model.register_forward_hook(lambda _m, args, _o: calls.append(len(args[0])))
    loss = ds.engine(**kinds[0].model_inputs(pixel_dtype=torch.bfloat16)).loss
    ds.engine.backward(loss)
    text_step_grad = max(safe_get_local_grad(param).abs().max().item() for param in ds.model.image_parameters())
    ds.engine.step()
    hook.remove()
    with gathered_parameters([conv]):
        moved_on_text = (conv.detach() - before_text).abs().max().item()
    optimizer = ds.engine.optimizer
    dtypes = [str(optimizer.gradient_accumulation_dtype), str(optimizer.communication_data_type)]
    result = {"losses": losses, "vision_moved": moved, "grad_dtypes": dtypes, "param_dtype": str(ds.model.dtype),
              "text_step_vision_calls": len(calls), "vision_moved_on_text": moved_on_text,
              "text_step_vision_grad": text_step_grad, "persistent": len(persistent),
              "kept_whole": len(kept), "kept_persistent": sum(id(p) in persistent for p in kept),
              "kept_available": sum(p.ds_status == ZeroParamStatus.AVAILABLE for p in kept),
              "kept_hooked": len(hooked), "gathers": gathers}  # fmt: skip
    result |= validation(ds.engine, kinds, rank)
    (out / f"rank{rank}.json").write_text(json.dumps(result))
    close_distributed()


WARM_UP = 2  # micro-steps: ZeRO-3 records the module order in the first and prefetches from the second


@contextmanager
def counted_gathers():
    """The all-gathers DeepSpeed starts inside the block: [count]."""
    counted, original = [0], deepspeed.comm.allgather_fn

    def allgather_fn(*args, **kwargs):
        counted[0] += 1
        return original(*args, **kwargs)

    deepspeed.comm.allgather_fn = allgather_fn
    try:
        yield counted
    finally:
        deepspeed.comm.allgather_fn = original


def validation(engine, kinds, rank: int) -> dict:
    """Rank 0 holds three batches (text and image-with-crops for source 0, text for source 1), rank 1 one
    (a global-view-only image for source 1): rank 1 runs stand-ins while rank 0 goes on."""
    text, crops, small = kinds
    held = [
        [SourceBatch(0, text, []), SourceBatch(0, crops, []), SourceBatch(1, text, [])],
        [SourceBatch(1, small, [])],
    ]
    engine.eval()
    with torch.no_grad():
        sums = evaluate(engine, held[rank], stand_in_batch(0), num_sources=2)
        reference = torch.zeros(2, 2, dtype=torch.float64)  # every batch on every rank, summed here
        for item in held[0] + held[1]:
            inputs = item.batch.model_inputs(pixel_dtype=torch.bfloat16)
            loss = engine(**inputs, num_items_in_batch=1).loss
            targets = int((item.batch.labels[:, 1:] != -100).sum())
            reference[item.source] += torch.tensor([loss.item(), targets], dtype=torch.float64)
    engine.train()
    return {"eval_sums": sums.tolist(), "eval_reference": reference.tolist()}


if __name__ == "__main__":
    main()
