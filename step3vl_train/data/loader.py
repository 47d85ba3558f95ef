"""The training data loader of one rank: packed batches, running stats, and exact resume.

Built on torchdata's `StatefulDataLoader`, which snapshots every worker's stream state with each batch
and restores workers and their round-robin turn together. Which rank reads what is decided here and
nowhere else: rank r's worker w is reader r * num_workers + w of world_size * num_workers.

Skipped samples are logged here, in the rank's main process (where the logging config is), once per key
over all of the rank's workers and passes; the bad keys seen are part of the state.
"""

from __future__ import annotations

import signal
import warnings
from collections.abc import Iterator
from functools import partial

import torch
from torchdata.stateful_dataloader import StatefulDataLoader

from step3vl_train.data.config import DataConfig, loader_workers
from step3vl_train.data.packing import PackedBatch, collate_packs
from step3vl_train.data.skips import SkipLog
from step3vl_train.data.stats import DataStats
from step3vl_train.data.stream import PackedStream
from step3vl_train.processing.processor import Step3VLProcessor

# torchdata 0.11 calls a torch API that torch 2.13 deprecates; nothing we can act on.
warnings.filterwarnings("ignore", message="'set_vital' is deprecated")


def ignore_sigterm(worker_id: int) -> None:
    """Each loader worker's `worker_init_fn`. A SIGTERM sent to the whole process group (Slurm's, a
    container's stop) would end the worker at once (torch's handler) and fail the rank's next batch; the
    rank stops at a step boundary instead (train/preemption.py), and its workers end with its loader."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


class PackedLoader:
    def __init__(
        self,
        cfg: DataConfig,
        processor: Step3VLProcessor,
        rank: int = 0,
        world_size: int = 1,
        phase_weights: list[dict[str, float]] | None = None,
        cpu_share: int = 1,
    ):
        """`phase_weights`: the mixture's weights by source name in each phase of a run in phases
        (train/phases.py); by default one phase of the sources' own weights. `cpu_share`: how many ranks'
        CPUs `data.num_workers: auto` gives this loader (a sequence-parallel group's, which reads for all
        of its ranks)."""
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world size {world_size}")
        self.cfg = cfg
        self.rank = rank
        self.world_size = world_size
        pad = processor.tokenizer.pad_token_id
        self.collate = partial(collate_packs, pad_token_id=pad if pad is not None else 0)
        self.stream = PackedStream(cfg, processor, rank, world_size, phase_weights)
        self.num_workers = loader_workers(cfg.num_workers, cpu_share)
        self.loader = self._dataloader()
        self._worker_stats: dict[int, DataStats] = {}
        self.skip_log = SkipLog()

    def _dataloader(self) -> StatefulDataLoader:
        workers = self.num_workers
        return StatefulDataLoader(
            self.stream,
            batch_size=self.cfg.micro_batch_size,
            num_workers=workers,
            prefetch_factor=self.cfg.prefetch_factor if workers else None,
            persistent_workers=False,
            pin_memory=torch.cuda.is_available(),  # PackedBatch.pin_memory: the copy to the GPU is then asynchronous
            collate_fn=self.collate,
            worker_init_fn=ignore_sigterm,  # a SIGTERM to the process group is the rank's to handle
        )

    def __iter__(self) -> Iterator[PackedBatch]:
        """Micro-batches: `.batch` for the model, `.keys` naming the samples in each row."""
        for packed in self.loader:
            self._worker_stats[packed.worker] = packed.stats
            for skip in packed.skipped:
                self.skip_log.record(skip)
            if packed.batch is not None:
                yield packed
        self.skip_log.flush()

    @property
    def phase(self) -> int:
        return self.stream.phase

    def enter_phase(self, phase: int) -> None:
        """From the next iteration on, each worker draws in `phase`'s weights once its current window is
        packed. The workers restart from the last batch handed out: drop any iterator over this loader."""
        state = self.loader.state_dict()
        self.stream.phase = phase
        self.loader.load_state_dict(state)

    def stats(self) -> DataStats:
        """This rank's totals over its workers, up to the last batch handed out; `skipped_unique` counts
        the rank's distinct bad keys."""
        total = DataStats()
        for stats in self._worker_stats.values():
            total = total.merge(stats)
        total.skipped_unique = self.skip_log.unique()
        return total

    def skipped_keys(self) -> dict[str, str]:
        """This rank's bad keys, key -> reason; the union over ranks counts each bad sample once."""
        return dict(self.skip_log.seen)

    def state_dict(self) -> dict:
        return {
            "topology": self._topology(),
            "loader": self.loader.state_dict(),
            "worker_stats": {worker: stats.state_dict() for worker, stats in self._worker_stats.items()},
            "skipped_keys": self.skipped_keys(),
        }

    def load_state_dict(self, state: dict) -> None:
        saved = state["topology"]
        if self.cfg.num_workers == "auto" and saved["num_workers"] != self.num_workers:
            # Each worker's position belongs to it: `auto` resumes with the workers the checkpoint had.
            self.num_workers = saved["num_workers"]
            self.loader = self._dataloader()
        if saved != self._topology():
            changed = ", ".join(f"{k} {saved[k]} -> {v}" for k, v in self._topology().items() if saved[k] != v)
            raise ValueError(
                f"cannot resume the data loader: {changed}. Each reader's position belongs to one (rank, worker) "
                "pair; resume with the world size and data.num_workers the checkpoint was written with."
            )
        self.loader.load_state_dict(state["loader"])
        self._worker_stats = {int(w): DataStats.from_state_dict(s) for w, s in state["worker_stats"].items()}
        self.skip_log.seen = dict(state.get("skipped_keys", {}))  # absent from states before unique counts

    def _topology(self) -> dict:
        return {"world_size": self.world_size, "rank": self.rank, "num_workers": self.num_workers}
