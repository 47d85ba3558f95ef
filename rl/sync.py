"""Weight sync: the policy's ZeRO-3 partitions, gathered a bucket at a time on every training rank,
streamed to the rollout engines. Never one call per parameter.

- `RaySender` (the transformers engine, CPU or GPU): rank 0 puts each gathered bucket once into Ray's
  object store, and every engine loads it from there.
- `VLLMSender` (the vLLM engine): vLLM's trainer-side weight-transfer engine, over NCCL to engines on
  other GPUs or CUDA IPC to engines sharing the trainer's GPUs, fed by `ZeroWeightSource`.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import deepspeed
import torch
from torch import nn


def parameter_buckets(model: nn.Module, limit_bytes: int) -> Iterator[list[tuple[str, nn.Parameter]]]:
    """Consecutive parameters, about `limit_bytes` of full (gathered) tensors a bucket."""
    bucket, size = [], 0
    for name, param in model.named_parameters():
        nbytes = getattr(param, "ds_numel", param.numel()) * param.element_size()
        if bucket and size + nbytes > limit_bytes:
            yield bucket
            bucket, size = [], 0
        bucket.append((name, param))
        size += nbytes
    if bucket:
        yield bucket


def gathered(model: nn.Module, limit_bytes: int) -> Iterator[tuple[str, torch.Tensor]]:
    """Every full parameter in order, gathered from the ZeRO-3 partitions a bucket at a time. A collective:
    every rank of the group iterates it to the end. A tensor is valid until the next bucket is gathered."""
    for bucket in parameter_buckets(model, limit_bytes):
        with deepspeed.zero.GatheredParameters([param for _, param in bucket]):
            for name, param in bucket:
                yield name, param.data


class RaySender:
    def __init__(self, model: nn.Module, engines: list, rank: int, bucket_bytes: int):
        self.model, self.engines, self.rank, self.bucket_bytes = model, engines, rank, bucket_bytes

    def send(self) -> dict[str, float]:
        import ray  # here, not at the top: the trainer side of RL also runs without Ray (benchmarks/gpu)

        started, sent, buckets = time.perf_counter(), 0, 0
        for bucket in parameter_buckets(self.model, self.bucket_bytes):
            with deepspeed.zero.GatheredParameters([param for _, param in bucket]):
                if self.rank == 0:
                    tensors = {name: param.data.detach().to("cpu", copy=True) for name, param in bucket}
                    ref = ray.put(tensors)
                    ray.get([engine.load_weights.remote(ref) for engine in self.engines])
                    sent += sum(t.numel() * t.element_size() for t in tensors.values())
                    buckets += 1
        if self.rank == 0:
            ray.get([engine.finish_weight_update.remote() for engine in self.engines])
        return {"sync_bytes": float(sent), "sync_buckets": float(buckets), "sync_s": time.perf_counter() - started}


class VLLMSender:
    """vLLM's `NCCLTrainerWeightTransferEngine` / `IPCTrainerWeightTransferEngine`, fed from ZeRO-3."""

    def __init__(
        self,
        model: nn.Module,
        engines: list,
        rank: int,
        bucket_bytes: int,
        backend: str,
        engine_world_size: int,
        master_address: str,
        master_port: int,
    ):
        from vllm.distributed.weight_transfer.clients import RayVLLMWeightSyncClient
        from vllm.distributed.weight_transfer.factory import WeightTransferTrainerFactory
        from vllm.distributed.weight_transfer.ipc_engine import IPCTrainerInitInfo
        from vllm.distributed.weight_transfer.nccl_engine import NCCLTrainerInitInfo

        if backend == "nccl":  # the sender is NCCL rank 0; every engine worker joins after it
            info = NCCLTrainerInitInfo(master_address, master_port, 1 + engine_world_size, rank=rank)
        elif backend == "ipc":
            info = IPCTrainerInitInfo(rank=rank)
        else:
            raise ValueError(f"rollout.weight_transfer must be 'nccl' or 'ipc', not {backend!r}")
        self.rank = rank
        source = zero_weight_source(model, bucket_bytes)
        client = RayVLLMWeightSyncClient(engines)
        self.transfer = WeightTransferTrainerFactory.trainer_init(info, client=client, source=source)

    def send(self) -> dict[str, float]:
        started = time.perf_counter()
        self.transfer.send_weights()
        return {"sync_s": time.perf_counter() - started}


def zero_weight_source(model: nn.Module, bucket_bytes: int):
    """A vLLM `WeightSource` over a ZeRO-3 model: metadata from the partitioned parameters' full shapes,
    `iter_full` gathering a bucket at a time on every rank (rank 0 sends)."""
    from functools import cached_property

    from vllm.distributed.weight_transfer.base import ParamMeta, WeightSource

    class ZeroWeightSource(WeightSource):
        @cached_property
        def metadata(self) -> list[ParamMeta]:
            return [
                ParamMeta(name, param.dtype, tuple(getattr(param, "ds_shape", param.shape)))
                for name, param in model.named_parameters()
            ]

        def iter_full(self) -> Iterator[tuple[str, torch.Tensor]]:
            yield from gathered(model, bucket_bytes)

    return ZeroWeightSource()
