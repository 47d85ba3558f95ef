"""Placing the actors: the training ranks in one placement group (a bundle each), the rollout engines beside."""

from __future__ import annotations

import socket

import ray
from ray.util.placement_group import placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy


def rendezvous_address() -> tuple[str, int]:
    """This node's address and a free port on it, for a process group's rendezvous."""
    with socket.socket() as probe:
        probe.bind(("", 0))
        return ray.util.get_node_ip_address(), probe.getsockname()[1]


def on_bundle(group, index: int) -> PlacementGroupSchedulingStrategy:
    return PlacementGroupSchedulingStrategy(placement_group=group, placement_group_bundle_index=index)


def start_train_group(
    world_size: int, num_gpus: float, config: dict, pad_token_id: int, share: float = 1.0
) -> tuple[list, object]:
    """`world_size` TrainWorker actors forming one torch.distributed group, one bundle each; they take
    `share` of their bundle's GPUs (less than 1 when rollout engines are colocated on them)."""
    from rl.workers.train import TrainWorker

    group = placement_group([{"CPU": 1, "GPU": num_gpus} if num_gpus else {"CPU": 1}] * world_size, strategy="PACK")
    ray.get(group.ready())
    rendezvous = ray.remote(rendezvous_address).options(num_cpus=0, scheduling_strategy=on_bundle(group, 0))
    address, port = ray.get(rendezvous.remote())
    actor = ray.remote(TrainWorker)
    workers = [
        actor.options(num_cpus=1, num_gpus=num_gpus * share, scheduling_strategy=on_bundle(group, rank)).remote(
            rank, world_size, address, port, config, pad_token_id
        )
        for rank in range(world_size)
    ]
    return workers, group


def start_rollout_engines(
    engine: str,
    options: list[dict],
    num_gpus: float,
    environment: dict[str, str],
    colocate_with=None,
    concurrency: int = 1,
) -> list:
    """An engine for each of `options` (its keyword arguments), each on its own `num_gpus`, or on bundle i of
    the training group `colocate_with`; `environment`: variables set in the engines' processes;
    `concurrency` 2: a second thread takes `pause_generation` while a generation runs (rollout.partial)."""
    from rl.workers.rollout import RolloutWorker

    actor = ray.remote(RolloutWorker)
    return [
        actor.options(
            num_cpus=0 if colocate_with else 1,
            num_gpus=num_gpus,
            max_concurrency=concurrency,
            runtime_env={"env_vars": environment} if environment else None,
            **({"scheduling_strategy": on_bundle(colocate_with, i)} if colocate_with else {}),
        ).remote(engine, **kwargs)
        for i, kwargs in enumerate(options)
    ]
