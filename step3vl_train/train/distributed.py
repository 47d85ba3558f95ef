"""The process group of a training job: started from torchrun's environment, closed in step."""

from __future__ import annotations

import os
import socket

import deepspeed
import torch
import torch.distributed as dist


def init_distributed() -> None:
    """The process group the environment describes (torchrun's, or a Ray worker's). Started without
    torchrun (no `RANK`), the script is one rank of one, as `torchrun --nproc-per-node 1` would start it
    (DeepSpeed would otherwise look for MPI)."""
    if "RANK" not in os.environ:
        os.environ.update(
            RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port())
        )
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    deepspeed.init_distributed(dist_backend=backend)
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))


def close_distributed(wait_for_peers: bool = True) -> None:
    """Tears the process group down, by default once every rank has finished its collectives: a rank whose
    peer has already closed its gloo pairs aborts ("terminate called without an active exception"). A rank
    leaving on an error must not wait (the others are in a collective of their own, and would hang)."""
    if wait_for_peers:
        dist.barrier()
    dist.destroy_process_group()


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on `host` now (the OS's choice)."""
    with socket.socket() as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]


def until_every_rank_is_done(items, device: torch.device):
    """`items`, then None until every rank's have run out: one MAX all-reduce before each, so that every
    rank makes as many collective calls (ZeRO-3 forwards) as the rank with the most items."""
    items = iter(items)
    while True:
        item = next(items, None)
        more = torch.tensor(int(item is not None), device=device)
        dist.all_reduce(more, op=dist.ReduceOp.MAX)
        if not more:
            return
        yield item
