r"""The reward-model service for RLHF: python rl/serve_rm.py rm=scalar|genrm [overrides].

export STEP3VL_RM_TOKEN=$(python -c 'import secrets; print(secrets.token_urlsafe(32))')
python rl/serve_rm.py rm=scalar rm.scalar.model=/models/rm_hf replicas=8 replica_gpus=1 batch.max_size=64
python rl/serve_rm.py rm=genrm rm.judge.backend=openai rm.judge.endpoint.base_url=http://judge:8000/v1
python rl/serve_rm.py rm=scalar rm.scalar.model=outputs/demo/rm_hf rm.scalar.processor=configs/processor/tiny.yaml

The token comes from STEP3VL_RM_TOKEN (or token_file=PATH), never from the command line. The service
binds 127.0.0.1 unless host= says otherwise; the API is in docs/rlhf.md.

Stopping: SIGTERM (what schedulers and containers send) or Ctrl-C drains the service. New requests, and
/healthz, get 503 with Retry-After; the requests in flight have drain_timeout_s (20) to finish; then Serve
shuts down, and the Ray instance the service started (not a cluster it joined with ray.address=) with every
process of its own, and the service exits 0 with a line saying what it did. A second Ctrl-C cuts the drain
short (exit code 130).
"""

import signal
import sys
import threading

import ray
from omegaconf import DictConfig, OmegaConf
from ray import serve

from rl.config import RayConfig
from rl.preflight import check_service_model
from rl.rm_service.config import ServiceConfig, read_token
from rl.rm_service.launch import drain_service, start_service
from step3vl_train.cli import launch
from step3vl_train.usage import build


def serve_forever(cfg: DictConfig) -> None:
    raw = OmegaConf.to_container(cfg, resolve=True)
    ray_config = build(RayConfig, raw.pop("ray"), "ray.")
    config = ServiceConfig.from_dict(raw)
    token = read_token(config)
    check_service_model(config)
    # Without ray.address, a Ray instance of its own: never one that happens to run on the machine.
    ray.init(address=ray_config.address or "local", num_cpus=ray_config.num_cpus, include_dashboard=False)
    stop = StopSignal()  # after ray.init, which installs a SIGTERM handler of its own that exits at once
    try:
        url = start_service(config, raw, token)
        print(f"reward-model service ({config.rm.backend}) at {url}: POST /v1/score, GET /v1/stats, GET /healthz")
        print(f"{stop.wait()}: draining for up to {config.drain_timeout_s:g} s", file=sys.stderr, flush=True)
        drained = drain_service(config)
    finally:
        serve.shutdown()
        ray.shutdown(wait_for_processes=True)
    print(f"stopped: {drained}; Serve and Ray are shut down", flush=True)


class StopSignal:
    """The first SIGTERM or SIGINT, waited for in the main thread. After it, SIGINT raises KeyboardInterrupt
    again, so that a second Ctrl-C cuts the drain short."""

    def __init__(self):
        self.received = threading.Event()
        self.name = ""
        signal.signal(signal.SIGTERM, self.handle)
        signal.signal(signal.SIGINT, self.handle)

    def handle(self, signum: int, frame) -> None:
        if not self.received.is_set():
            self.name = signal.Signals(signum).name
            self.received.set()
            signal.signal(signal.SIGINT, signal.default_int_handler)

    def wait(self) -> str:
        # Python runs a handler in the main thread once it wakes: a signal that lands on one of Ray's threads
        # would not wake a wait without a timeout.
        while not self.received.wait(timeout=1):
            pass
        return self.name


if __name__ == "__main__":
    launch(serve_forever, "serve_rm", __doc__)
