"""The reward-model service under load on the CPU: dynamic batching's throughput against batch size 1.

python benchmarks/rm_service_cpu.py [--model DIR] [--clients 64] [--batch-sizes 1 32] [--requests 1024]
                                    [--replicas 1] [--max-seconds 60] [--wait-s 0.01]

For each batch size, one Ray Serve application on loopback (rl/rm_service/, started as rl/serve_rm.py
starts it: `start_service`, a bearer token from the environment) with `batch.max_size` that size,
`batch.wait_s` 0.01 s, `max_queue` the number of clients, replicas of one CPU (Ray gives each 1 torch
thread; the other core is the proxy's, the ingress's and the clients'). `--clients` threads send
one-item requests back to back until `--requests` are answered or `--max-seconds` have passed, after a
warm-up of one request a client. An item is a synthetic RLHF prompt (one 224 px shape, JPEG, base64)
with an open question and a 30-word response. The model is `--model` (a scalar RM export), or else a
random tiny one (configs/model/tiny.yaml): the architecture is what costs, not the weights.

The backend is `ScalarBackend` (the same forward), subclassed to append each batch's size and seconds
to a file, since Serve does not report the batches it forms. Prints two Markdown tables: items/s, p50
and p99 latency of a request, mean items a batch, the replicas' share of the wall time in their forward,
and each row's speed-up over batch size 1; then the CPU time an item of each process (psutil), with the
whole machine's, so that someone else's load on the machine shows.
"""

import argparse
import itertools
import logging
import os
import secrets
import statistics
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import ray
import requests
import torch
from omegaconf import OmegaConf
from ray import serve

from rl.rm_service.backends import ScalarBackend
from rl.rm_service.config import ScalarRMConfig, ServiceConfig, read_token
from rl.rm_service.items import encode_item
from rl.rm_service.launch import start_service, stop_service
from step3vl_train.data.shards import encode_image
from step3vl_train.data.synthetic.tasks import open_prompt, sentences
from step3vl_train.train.distributed import free_port

REPO = Path(__file__).resolve().parents[1]
TOKEN_ENV = "STEP3VL_RM_BENCH_TOKEN"
GOAL = 4.0


class CountedScalarBackend(ScalarBackend):
    """The scalar backend, writing `<items> <seconds>` a batch to `log` (its first line: the replica's
    torch threads)."""

    def __init__(self, log: str, **scalar):
        super().__init__(ScalarRMConfig(**scalar))
        self.log = Path(log)
        self.log.write_text(f"threads {torch.get_num_threads()}\n")

    def score(self, items):
        started = time.perf_counter()
        verdicts = super().score(items)
        with self.log.open("a") as log:
            log.write(f"{len(items)} {time.perf_counter() - started:.6f}\n")
        return verdicts


def tiny_reward_model(directory: Path) -> Path:
    """A random tiny scalar RM in the export's layout: weights, tokenizer and score statistics."""
    from step3vl_train.model import Step3VLConfig
    from step3vl_train.model.value import Step3VLForValue
    from step3vl_train.processing.tokenizer import load_tokenizer
    from step3vl_train.train.reward_model import RewardStats

    config = Step3VLConfig.from_dict(OmegaConf.to_container(OmegaConf.load(REPO / "configs/model/tiny.yaml")))
    torch.manual_seed(0)
    Step3VLForValue(config).save_pretrained(directory)
    load_tokenizer("tiny").save_pretrained(directory)
    RewardStats(0.0, 1.0).save(directory)
    return directory


def make_items(count: int) -> list[dict]:
    """Distinct wire-format items: a one-shape image, an open question and a ~30-word response."""
    items = []
    for index in range(count):
        rng = np.random.default_rng([7, index])
        image, turn, _ = open_prompt(rng)
        response = " ".join(sentences(rng, 6).split()[:30])
        items.append(encode_item(str(index), [turn], [encode_image(image, "jpg")], response, None))
    return items


def load(
    url: str, token: str, items: list[dict], clients: int, total: int, max_seconds: float = float("inf")
) -> tuple[float, list[float]]:
    """`clients` threads sending one-item requests back to back until `total` are answered, or none is sent
    after `max_seconds`: (wall seconds, each request's latency in seconds). A request that fails, or an item
    not scored "ok", stops the run."""
    tickets, latencies, errors = itertools.count(), [], []
    headers = {"Authorization": f"Bearer {token}"}
    deadline = time.perf_counter() + max_seconds

    def client() -> None:
        with requests.Session() as session:
            while (ticket := next(tickets)) < total and time.perf_counter() < deadline and not errors:
                body = {"items": [items[ticket % len(items)]]}
                started = time.perf_counter()
                try:
                    reply = session.post(f"{url}/v1/score", json=body, headers=headers, timeout=120)
                except requests.RequestException as error:
                    errors.append(repr(error))
                    return
                latencies.append(time.perf_counter() - started)
                if reply.status_code != 200 or reply.json()["results"][0]["status"] != "ok":
                    errors.append(f"{reply.status_code}: {reply.text[:500]}")

    threads = [threading.Thread(target=client) for _ in range(clients)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - started
    if errors:
        raise SystemExit(f"{len(errors)} request(s) failed, the first: {errors[0]}")
    return wall, latencies


ROLES = {"proxy": "ProxyActor", "ingress": ":ingress", "backend": ":backend"}


def cpu_seconds() -> dict[str, float]:
    """CPU seconds so far of this process (the clients), of its Ray cluster's processes by role (the rest:
    raylet, GCS, Serve's controller...), and of the whole machine (anyone's work included)."""
    me = psutil.Process()
    totals = dict.fromkeys(["clients", *ROLES, "rest of Ray"], 0.0)
    totals["clients"] = sum(me.cpu_times()[:2])
    for child in me.children(recursive=True):  # this driver started the cluster: its processes descend from it
        try:
            line, seconds = " ".join(child.cmdline()), sum(child.cpu_times()[:2])
        except psutil.Error:
            continue
        role = next((role for role, marker in ROLES.items() if marker in line), "rest of Ray")
        totals[role] += seconds
    machine = psutil.cpu_times()
    idle = ("idle", "iowait", "steal", "guest", "guest_nice")  # guest time is already in user time
    totals["machine"] = sum(machine) - sum(getattr(machine, field, 0.0) for field in idle)
    return totals


def read_batches(log: Path) -> tuple[int, list[tuple[int, float]]]:
    """(the replica's torch threads, (items, seconds) of each batch so far)."""
    first, *rest = log.read_text().splitlines()
    return int(first.split()[1]), [(int(n), float(s)) for n, s in (line.split() for line in rest)]


def run_batch_size(args, model: Path, items: list[dict], max_size: int, port: int, work: Path) -> dict:
    log = work / f"batches_{max_size}.txt"
    raw = {
        "port": port,
        "token_env": TOKEN_ENV,
        "max_queue": args.clients,
        "replicas": args.replicas,
        "replica_cpus": 1,
        "batch": {"max_size": max_size, "wait_s": args.wait_s},
        "rm": {
            "backend": "benchmarks.rm_service_cpu:CountedScalarBackend",
            "options": {"log": str(log), "model": str(model), "processor": str(REPO / "configs/processor/tiny.yaml")},
        },
    }
    config = ServiceConfig.from_dict(raw)
    token = read_token(config)
    url = start_service(config, raw, token, ready_timeout_s=300)
    try:
        load(url, token, items, args.clients, args.clients)  # warm-up: one request a client
        _, warm_up = read_batches(log)
        before = cpu_seconds()
        wall, latencies = load(url, token, items, args.clients, args.requests, args.max_seconds)
        after = cpu_seconds()
        threads, batches = read_batches(log)
    finally:
        stop_service(config)
    batches = batches[len(warm_up) :]  # with several replicas the lines interleave: counts still hold
    quantiles = statistics.quantiles(latencies, n=100)
    forward = sum(seconds for _, seconds in batches)
    return {
        "max_size": max_size,
        "requests": len(latencies),
        "rate": len(latencies) / wall,
        "p50": quantiles[49],
        "p99": quantiles[98],
        "mean_batch": sum(n for n, _ in batches) / len(batches),
        "forward_ms": 1000 * forward / len(batches),
        "busy": forward / (wall * args.replicas),
        "threads": threads,
        "cpu": {role: (after[role] - before[role]) / len(latencies) for role in before},
        "machine_busy": (after["machine"] - before["machine"]) / (wall * psutil.cpu_count()),
    }


def report(args, rows: list[dict]) -> None:
    base = next((row for row in rows if row["max_size"] == 1), rows[0])
    model = args.model or "random tiny (configs/model/tiny.yaml)"
    print(
        f"\n{psutil.cpu_count()} CPUs; {args.replicas} replica(s) of 1 CPU, torch threads in a replica: "
        f"{rows[0]['threads']}; {args.clients} clients sending one-item requests after a warm-up of one each; "
        f"batch.wait_s {args.wait_s}; model: {model}\n"
    )
    print(
        "| batch.max_size | requests | items/s | p50 latency | p99 latency | mean items a batch | forward a batch |"
        f" replica busy in forward | speed-up over {base['max_size']} |\n|{'---|' * 9}"
    )
    for row in rows:
        print(
            f"| {row['max_size']} | {row['requests']} | {row['rate']:.1f} | {1000 * row['p50']:.0f} ms |"
            f" {1000 * row['p99']:.0f} ms | {row['mean_batch']:.1f} | {row['forward_ms']:.1f} ms | {row['busy']:.0%} |"
            f" {row['rate'] / base['rate']:.2f}x |"
        )
    roles = [role for role in rows[0]["cpu"] if role != "machine"]
    print(f"\nCPU ms an item by process, over the timed requests ({psutil.cpu_count()} cores shared by all):\n")
    print(f"| batch.max_size | {' | '.join(roles)} | whole machine | machine busy |\n|{'---|' * (len(roles) + 3)}")
    for row in rows:
        cells = " | ".join(f"{1000 * row['cpu'][role]:.1f}" for role in roles)
        print(f"| {row['max_size']} | {cells} | {1000 * row['cpu']['machine']:.1f} | {row['machine_busy']:.0%} |")
    best = max(rows, key=lambda row: row["rate"])
    speedup = best["rate"] / base["rate"]
    verdict = "met" if speedup >= GOAL else "NOT met"
    print(
        f"\nGoal >= {GOAL:.0f}x over batch size {base['max_size']}: {verdict} ({speedup:.2f}x at {best['max_size']})."
    )
    if base["busy"] < 0.5:
        print(
            f"Batch size {base['max_size']} left the replica out of its forward {1 - base['busy']:.0%} of the time: "
            "its requests waited upstream of the replica (Serve's router, the proxy, the ingress), not for the model."
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, help="a scalar RM export; default: a random tiny one")
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--requests", type=int, default=1024)
    parser.add_argument("--replicas", type=int, default=1)
    parser.add_argument("--max-seconds", type=float, default=60, help="a row sends no request after this")
    parser.add_argument("--wait-s", type=float, default=0.01, help="batch.wait_s: how long a batch waits to fill")
    args = parser.parse_args()
    logging.getLogger("ray.serve").setLevel(logging.WARNING)
    os.environ[TOKEN_ENV] = secrets.token_urlsafe(32)
    items = make_items(256)
    # The replicas import the counting backend from this file, as `benchmarks.rm_service_cpu`.
    path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    cpus = max(psutil.cpu_count(), args.replicas + 1)
    ray.init(
        num_cpus=cpus, include_dashboard=False, log_to_driver=False, runtime_env={"env_vars": {"PYTHONPATH": path}}
    )
    try:
        with tempfile.TemporaryDirectory() as tmp:
            work = Path(tmp)
            model = args.model or tiny_reward_model(work / "rm")
            port = free_port()
            rows = [run_batch_size(args, model, items, size, port, work) for size in args.batch_sizes]
    finally:
        serve.shutdown()
        ray.shutdown()
    report(args, rows)


if __name__ == "__main__":
    main()
