"""Weight sync: the policy's ZeRO-3 partitions, gathered a bucket at a time on every training rank,
streamed to the rollout engines. Never one call per parameter.

Only what training changes is sent. The first sync after the engines start (or restart with the run) sends
every tensor; later ones send the trainable tensors alone, so the frozen vision tower (1.96B parameters,
3.9 GB of bf16 at 10B) crosses once a run, not once an iteration.

- `RaySender` (the transformers engine, CPU or GPU): rank 0 puts each gathered bucket once into Ray's
  object store, and every engine loads it from there.
- `VLLMSender` (the vLLM engine): vLLM's trainer-side weight-transfer engine fed by `zero_weight_source`,
  packed into buffers of `rollout.sync_bucket_mb`. NCCL to engines on GPUs of their own: one transfer group,
  the sender at rank 0 and engine i's tensor-parallel workers at ranks 1 + i*TP ... i*TP + TP. CUDA IPC to
  engines sharing the training ranks' GPUs: every rank packs its gathered copy into one IPC buffer of its
  own, at least as large as the largest tensor (vLLM's producer refuses a tensor larger than the buffer; at
  10B the embeddings and the head are 1,187 MiB each, the second downsampler 324 MiB).
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import torch
from torch import nn

from rl.engines.fused import check_whole_modules
from step3vl_train.train.engine import gathered_parameters

NamedParameters = list[tuple[str, nn.Parameter]]


def sync_parameters(model: nn.Module, everything: bool) -> NamedParameters:
    """The parameters a sync sends: all of them, or the trainable ones only."""
    return [(name, param) for name, param in model.named_parameters() if everything or param.requires_grad]


def full_bytes(param: nn.Parameter) -> int:
    """Bytes of the full tensor, whether or not ZeRO-3 has partitioned it."""
    return getattr(param, "ds_numel", param.numel()) * param.element_size()


def ipc_buffer_bytes(parameters: NamedParameters, bucket_bytes: int) -> int:
    """The IPC buffer: a bucket, or the largest tensor where that is larger."""
    return max(bucket_bytes, *(full_bytes(param) for _, param in parameters))


def parameter_buckets(parameters: NamedParameters, limit_bytes: int) -> Iterator[NamedParameters]:
    """Consecutive parameters, about `limit_bytes` of full (gathered) tensors a bucket."""
    bucket, size = [], 0
    for name, param in parameters:
        if bucket and size + full_bytes(param) > limit_bytes:
            yield bucket
            bucket, size = [], 0
        bucket.append((name, param))
        size += full_bytes(param)
    if bucket:
        yield bucket


def gathered(parameters: NamedParameters, limit_bytes: int) -> Iterator[tuple[str, torch.Tensor]]:
    """Every full parameter in order, gathered from the ZeRO-3 partitions a bucket at a time. A collective:
    every rank of the group iterates it to the end. A tensor is valid until the next bucket is gathered."""
    for bucket in parameter_buckets(parameters, limit_bytes):
        with gathered_parameters([param for _, param in bucket]):
            for name, param in bucket:
                yield name, param.data


class RaySender:
    def __init__(self, model: nn.Module, engines: list, rank: int, bucket_bytes: int):
        self.model, self.engines, self.rank, self.bucket_bytes = model, engines, rank, bucket_bytes

    def send(self, everything: bool) -> dict[str, float]:
        import ray  # here, not at the top: the trainer side of RL also runs without Ray (benchmarks/gpu)

        started, sent, tensors_sent, buckets = time.perf_counter(), 0, 0, 0
        for bucket in parameter_buckets(sync_parameters(self.model, everything), self.bucket_bytes):
            with gathered_parameters([param for _, param in bucket]):
                if self.rank == 0:
                    tensors = {name: param.data.detach().to("cpu", copy=True) for name, param in bucket}
                    ref = ray.put(tensors)
                    ray.get([engine.load_weights.remote(ref) for engine in self.engines])
                    sent += sum(t.numel() * t.element_size() for t in tensors.values())
                    tensors_sent += len(tensors)
                    buckets += 1
        if self.rank == 0:
            ray.get([engine.finish_weight_update.remote() for engine in self.engines])
        return {
            "sync_bytes": float(sent),
            "sync_tensors": float(tensors_sent),
            "sync_buckets": float(buckets),
            "sync_s": time.perf_counter() - started,
        }


def engine_rank_offsets(num_engines: int, tensor_parallel_size: int) -> list[int]:
    """Each engine's first rank in the NCCL transfer group; the sender is rank 0. vLLM numbers a worker
    `rank_offset + data_parallel_index * TP + rank` (weight_transfer/nccl_common.py), and every engine we
    start is its own data-parallel index 0, so the offsets tell the engines apart."""
    return [1 + index * tensor_parallel_size for index in range(num_engines)]


class EngineFleetClient:
    """vLLM's weight-sync control plane (the `VLLMWeightSyncClient` protocol) over our rollout actors. Like
    vLLM's `RayVLLMWeightSyncClient` it fans every call out to all engines, except that each engine joins
    the NCCL transfer group at its own rank offset."""

    def __init__(self, engines: list, tensor_parallel_size: int):
        self.engines = engines
        self.rank_offsets = engine_rank_offsets(len(engines), tensor_parallel_size)

    def init_weight_transfer_engine(self, init_info: dict) -> None:
        import ray
        from vllm.distributed.weight_transfer.base import WeightTransferInitRequest

        infos = self.engine_init_infos(init_info)
        ray.get(
            [
                engine.init_weight_transfer_engine.remote(WeightTransferInitRequest(init_info=info))
                for engine, info in zip(self.engines, infos, strict=True)
            ]
        )

    def engine_init_infos(self, init_info: dict) -> list[dict]:
        """What each engine is told: its rank offset in the NCCL group (IPC has none)."""
        if "rank_offset" not in init_info:
            return [init_info] * len(self.engines)
        return [{**init_info, "rank_offset": offset} for offset in self.rank_offsets]

    def start_weight_update(self) -> None:
        self._all(lambda engine: engine.start_weight_update.remote())

    def update_weights(self, update_info) -> None:
        from vllm.distributed.weight_transfer.base import WeightTransferUpdateRequest

        request = WeightTransferUpdateRequest(update_info=update_info)
        self._all(lambda engine: engine.update_weights.remote(request))

    def finish_weight_update(self, weight_version: str | None = None) -> None:
        self._all(lambda engine: engine.finish_weight_update.remote())

    def shutdown_weight_transfer_engine(self) -> None:
        self._all(lambda engine: engine.shutdown_weight_transfer_engine.remote())

    def _all(self, call) -> None:
        import ray

        ray.get([call(engine) for engine in self.engines])


class VLLMSender:
    """vLLM's `NCCLTrainerWeightTransferEngine` / `IPCTrainerWeightTransferEngine`, fed from ZeRO-3."""

    def __init__(
        self,
        model: nn.Module,
        engines: list,
        rank: int,
        bucket_bytes: int,
        backend: str,
        tensor_parallel_size: int,
        master_address: str,
        master_port: int,
    ):
        from vllm.distributed.weight_transfer.factory import WeightTransferTrainerFactory

        check_whole_modules((name, param.requires_grad) for name, param in model.named_parameters())
        self.parameters = {everything: sync_parameters(model, everything) for everything in (True, False)}
        buffer_bytes = ipc_buffer_bytes(self.parameters[True], bucket_bytes) if backend == "ipc" else bucket_bytes
        info = trainer_init_info(
            backend, rank, len(engines), tensor_parallel_size, buffer_bytes, master_address, master_port
        )
        # vLLM's sources declare fixed metadata, so the two kinds of sync are two sources.
        self.sources = {
            everything: zero_weight_source(self.parameters[everything], bucket_bytes) for everything in (True, False)
        }
        client = EngineFleetClient(engines, tensor_parallel_size)
        self.transfer = WeightTransferTrainerFactory.trainer_init(info, client=client, source=self.sources[True])

    def send(self, everything: bool) -> dict[str, float]:
        started = time.perf_counter()
        self.transfer.source = self.sources[everything]
        self.transfer.send_weights()
        return {
            "sync_bytes": float(sum(full_bytes(param) for _, param in self.parameters[everything])),
            "sync_tensors": float(len(self.parameters[everything])),
            "sync_s": time.perf_counter() - started,
        }


def trainer_init_info(
    backend: str, rank: int, num_engines: int, tensor_parallel_size: int, buffer_bytes: int, address: str, port: int
):
    """vLLM's trainer-side init info: packed transfers in buffers of `buffer_bytes` (vLLM's IPC default is
    unpacked, which holds every sent tensor until the update ends: about 20 GB at 10B, on top of the woken
    engine), and for NCCL one group over the sender and every engine's workers."""
    from vllm.distributed.weight_transfer.ipc_engine import IPCTrainerInitInfo
    from vllm.distributed.weight_transfer.nccl_engine import NCCLTrainerInitInfo

    if backend == "nccl":
        world_size = 1 + num_engines * tensor_parallel_size
        return NCCLTrainerInitInfo(
            address, port, world_size, rank=rank, packed=True, packed_buffer_size_bytes=buffer_bytes
        )
    if backend == "ipc":
        return IPCTrainerInitInfo(rank=rank, packed=True, packed_buffer_size_bytes=buffer_bytes)
    raise ValueError(f"rollout.weight_transfer must be 'nccl' or 'ipc', not {backend!r}")


def zero_weight_source(parameters: NamedParameters, bucket_bytes: int):
    """A vLLM `WeightSource` over a ZeRO-3 model: metadata from the partitioned parameters' full shapes,
    `iter_full` gathering a bucket at a time on every rank (rank 0 sends)."""
    from functools import cached_property

    from vllm.distributed.weight_transfer.base import ParamMeta, WeightSource

    class ZeroWeightSource(WeightSource):
        @cached_property
        def metadata(self) -> list[ParamMeta]:
            return [
                ParamMeta(name, param.dtype, tuple(getattr(param, "ds_shape", param.shape)))
                for name, param in parameters
            ]

        def iter_full(self) -> Iterator[tuple[str, torch.Tensor]]:
            yield from gathered(parameters, bucket_bytes)

    return ZeroWeightSource()
