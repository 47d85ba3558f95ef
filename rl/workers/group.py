"""Placing the actors: the training ranks in one placement group (a bundle each), the rollout engines beside."""

from __future__ import annotations

import socket

import ray
from ray.util.placement_group import placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from rl.workers.rollout import RolloutWorker
from rl.workers.train import TrainWorker


def _rendezvous() -> tuple[str, int]:
    """The address and a free port on the node of rank 0, for torch.distributed's rendezvous."""
    with socket.socket() as probe:
        probe.bind(("", 0))
        return ray.util.get_node_ip_address(), probe.getsockname()[1]


def start_train_group(world_size: int, num_gpus: float, config: dict, pad_token_id: int) -> tuple[list, object]:
    """`world_size` TrainWorker actors forming one torch.distributed group; returns them and their group."""
    group = placement_group([{"CPU": 1, "GPU": num_gpus} if num_gpus else {"CPU": 1}] * world_size, strategy="PACK")
    ray.get(group.ready())

    def on_bundle(index: int) -> PlacementGroupSchedulingStrategy:
        return PlacementGroupSchedulingStrategy(placement_group=group, placement_group_bundle_index=index)

    address, port = ray.get(ray.remote(_rendezvous).options(num_cpus=0, scheduling_strategy=on_bundle(0)).remote())
    actor = ray.remote(TrainWorker)
    workers = [
        actor.options(num_cpus=1, num_gpus=num_gpus, scheduling_strategy=on_bundle(rank)).remote(
            rank, world_size, address, port, config, pad_token_id
        )
        for rank in range(world_size)
    ]
    return workers, group


def start_rollout_engines(count: int, num_gpus: float, engine: str, **kwargs) -> list:
    actor = ray.remote(RolloutWorker)
    return [actor.options(num_cpus=1, num_gpus=num_gpus).remote(engine, **kwargs) for _ in range(count)]
