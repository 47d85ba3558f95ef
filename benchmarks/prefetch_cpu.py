"""ZeRO-3's recorded module order over micro-steps of mixed batches, on 2 ranks (gloo, CPU): how often
DeepSpeed throws it away ("Invalidate trace cache", after which it prefetches nothing) and how many
all-gathers each micro-step's forward and backward start.

python benchmarks/prefetch_cpu.py [--steps 4] [--grad-accum 4]

The tiny model in bf16 with activation checkpointing, one view a tower call and 8 positions a head tile
(so that the calls' counts vary from one micro-step to the next as they do at scale), and ZeRO-3's
thresholds at zero (no tensor kept whole by its size, nothing kept gathered between calls), so that the
gathers of the tiny model are those a 10B model makes. The ranks hold different kinds of batch (text
only, an image with crops, a small image, two images) in a rotation that differs between them. Prints
the invalidations after the first two micro-steps (DeepSpeed records the order in the first) and the
gathers of each micro-step of rank 0.

The script uses only what the trainer used before issue 27 as well (build_engine, ComputeConfig), so run
from a checkout of an older commit (PYTHONPATH=that checkout) it measures that commit.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path.cwd()  # the checkout measured: this one, or an older one as the docstring says
WARM_UP = 2  # micro-steps: the order is recorded in the first, prefetched from the second
STEADY, END = "steady state from here", "steady state ends"


def batches(processor):
    from PIL import Image

    from step3vl_train.processing.processor import collate

    photo = Image.open(REPO / "data" / "samples" / "chelsea.png").convert("RGB")
    answer = {"role": "assistant", "content": "A cat. " * 30}

    def ask(*images):
        content = [{"type": "image"} for _ in images] + [{"type": "text", "text": "What is it?"}]
        return collate([processor([{"role": "user", "content": content}, answer], list(images))], 0)

    return [ask(), ask(photo), ask(photo.resize((120, 100))), ask(photo, photo.resize((300, 90)))]


def rank_main(out: Path, steps: int, grad_accum: int) -> None:
    import deepspeed
    import torch
    from omegaconf import OmegaConf

    from step3vl_train.model import Step3VLConfig
    from step3vl_train.model.compute import ComputeConfig
    from step3vl_train.processing.processor import load_processor
    from step3vl_train.train.config import OptimConfig
    from step3vl_train.train.distributed import close_distributed
    from step3vl_train.train.engine import build_engine, deepspeed_config

    deepspeed.init_distributed(dist_backend="gloo")
    rank = torch.distributed.get_rank()
    torch.manual_seed(0)
    config = Step3VLConfig.from_dict(OmegaConf.to_container(OmegaConf.load(REPO / "configs/model/tiny.yaml")))
    base = OmegaConf.to_container(OmegaConf.load(REPO / "configs/deepspeed/zero3.yaml"))
    base["zero_optimization"] |= {
        "log_trace_cache_warnings": True,
        "stage3_max_reuse_distance": 0,
        "stage3_max_live_parameters": 0,
        "stage3_prefetch_bucket_size": 20000,
        "stage3_param_persistence_threshold": 0,
    }
    ds_config = deepspeed_config(base, 1, grad_accum, 1.0, bf16=True)
    ds = build_engine(config, OptimConfig(lr=1e-3), ds_config, compute=ComputeConfig(vision_chunk=1, loss_chunk=8))
    ds.model.gradient_checkpointing_enable()
    ds.engine.train()
    kinds = batches(load_processor("tiny", str(REPO / "configs/processor/tiny.yaml")))
    counted, original = [0], deepspeed.comm.allgather_fn

    def allgather_fn(*args, **kwargs):
        counted[0] += 1
        return original(*args, **kwargs)

    deepspeed.comm.allgather_fn = allgather_fn
    gathers = []
    for micro_step in range(steps * grad_accum):
        if micro_step == WARM_UP and rank == 0:  # DeepSpeed prints the invalidations on rank 0
            print(STEADY, flush=True)
        batch = kinds[(micro_step * 7 + rank * 3) % len(kinds)]
        counted[0] = 0
        loss = ds.engine(**batch.model_inputs(pixel_dtype=torch.bfloat16)).loss
        ds.engine.backward(loss)
        gathers.append(counted[0])
        ds.engine.step()
    if rank == 0:
        print(END, flush=True)
    (out / f"rank{rank}.json").write_text(json.dumps({"gathers": gathers}))
    close_distributed()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--grad-accum", type=int, default=4)
    parser.add_argument("--rank-out", type=Path, help=argparse.SUPPRESS)  # set for the ranks torchrun starts
    args = parser.parse_args()
    if args.rank_out is not None:
        rank_main(args.rank_out, args.steps, args.grad_accum)
        return
    out = Path(tempfile.mkdtemp())
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", __file__]
    command += ["--rank-out", str(out), "--steps", str(args.steps), "--grad-accum", str(args.grad_accum)]
    done = subprocess.run(command, capture_output=True, text=True, env=env, check=True)
    steady = done.stdout.split(STEADY)[1].split(END)[0]
    gathers = json.loads((out / "rank0.json").read_text())["gathers"]
    print(
        json.dumps(
            {
                "micro_steps": len(gathers),
                "invalidations_after_warm_up": steady.count("Invalidate trace cache"),
                "gathers_a_micro_step": gathers,
            }
        )
    )


if __name__ == "__main__":
    main()
