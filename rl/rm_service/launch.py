"""Starting the service on a Ray cluster (`rl/serve_rm.py`, or an RL run with `reward.service.launch=true`)
and waiting until it answers; draining it before Serve shuts down."""

from __future__ import annotations

import time
from dataclasses import dataclass

import requests
from ray import serve

from rl.rm_service.app import build_app
from rl.rm_service.config import ServiceConfig
from step3vl_train.train.distributed import free_port


def start_service(config: ServiceConfig, raw: dict, token: str, ready_timeout_s: float = 300.0) -> str:
    """Deploys the application and returns its URL once `/healthz` answers. The HTTP proxy runs on the
    head node only, bound to `config.host`, on `config.port` (0: a free one)."""
    port = config.port or free_port(config.host)
    serve.start(
        proxy_location="HeadOnly",
        http_options={"host": config.host, "port": port},
        logging_config={"enable_access_log": False},  # the proxy's line per request
    )
    serve.run(build_app(config, raw, token), name=config.app_name, route_prefix="/")
    url = f"http://{'127.0.0.1' if config.host in ('0.0.0.0', '::') else config.host}:{port}"
    wait_healthy(url, ready_timeout_s)
    return url


def wait_healthy(url: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if requests.get(f"{url}/healthz", timeout=5).status_code == 200:
                return
        except requests.RequestException:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(
                f"the reward-model service at {url} did not answer /healthz within {timeout_s} s. A Serve instance "
                "already running on this Ray cluster keeps its own HTTP port: start one service (rl/serve_rm.py) "
                "and give the runs reward.service.url"
            )
        time.sleep(0.5)


@dataclass
class Drained:
    in_flight: int  # requests in the service when it was told to drain
    cut_off: int  # of those, still unanswered at the deadline
    seconds: float

    def __str__(self) -> str:
        finished = self.in_flight - self.cut_off
        cut_off = f"{self.cut_off} cut off at the deadline" if self.cut_off else "none cut off"
        return f"finished {finished} request(s) in flight in {self.seconds:.1f} s ({cut_off})"


def drain_service(config: ServiceConfig) -> Drained:
    """Stops the service taking requests (503 with Retry-After from now on, `/healthz` too) and waits up to
    `config.drain_timeout_s` for those in flight. Shutting Serve and Ray down is the caller's."""
    started = time.monotonic()
    ingress = serve.get_app_handle(config.app_name)
    # The handle's own bound only guards against an ingress that no longer answers.
    in_flight, cut_off = ingress.drain.remote(config.drain_timeout_s).result(timeout_s=config.drain_timeout_s + 30)
    return Drained(in_flight, cut_off, time.monotonic() - started)
