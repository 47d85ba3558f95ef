"""The service as a Ray Serve application: an ingress that guards and counts, and backend replicas that
batch items across requests (`@serve.batch`).

The ingress, in order: `GET /healthz` answers anyone; everything else needs `Authorization: Bearer
<token>` (401); a request beyond `max_queue` in flight gets 503 with Retry-After; a body over
`max_body_mb` gets 413 (read no further than the limit); a malformed body or item gets 400 naming the
item. Each item is then sent to a backend replica on its own, so concurrent requests fill the same
batches; an item whose replica dies is sent again (`backend_retries`), and one still unscored at
`request_timeout_s` comes back "timeout". Penalties (rl/rewards/penalties.py) are applied here, to the
backend's preference. Every item of a request comes back once, scored or with the status that masks it.

A failure comes back as one plain line (`backend: RuntimeError: ...`); its traceback goes to the service's
log. Told to drain (`drain`, what rl/rm_service/launch.py calls on SIGTERM), the ingress answers every new
request, `/healthz` included, 503 with Retry-After, and returns once those in flight are done or the deadline
has passed.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
from collections import Counter

from ray import serve
from ray.exceptions import RayActorError, RayTaskError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError, ReplicaUnavailableError
from starlette.requests import Request
from starlette.responses import JSONResponse

from rl.prompts import question_text
from rl.rewards.penalties import Penalties
from rl.rm_service.backends import build_backend
from rl.rm_service.config import RMConfig, ServiceConfig
from rl.rm_service.items import BadRequest, ItemScore, ScoreItem, parse_request, result_json
from step3vl_train.cli import quiet_known_warnings
from step3vl_train.processing.chat import answer_text
from step3vl_train.usage import build

logger = logging.getLogger("rl.rm_service")
# A replica that died or went away mid-call: the item can go to another one.
REPLICA_GONE = (RayActorError, ReplicaUnavailableError, DeploymentUnavailableError, BackPressureError)


class TooLarge(Exception):
    pass


class BackendReplica:
    """One backend replica. Items of concurrent calls are gathered into batches of up to `batch.max_size`;
    the backend runs in a thread, so the replica goes on taking items while a batch is scored. A batch
    still running after `stuck_after_s` fails the replica's health check: Serve replaces the replica, and
    the ingress sends its items again."""

    def __init__(self, rm: dict, max_batch_size: int, batch_wait_s: float, stuck_after_s: float):
        quiet_known_warnings()
        self.backend = build_backend(build(RMConfig, rm, "rm."))
        self.score.set_max_batch_size(max_batch_size)
        self.score.set_batch_wait_timeout_s(batch_wait_s)
        self.stuck_after_s = stuck_after_s
        self.busy_since: float | None = None

    def needs_reference(self) -> bool:
        return self.backend.needs_reference

    @serve.batch
    async def score(self, items: list[ScoreItem]) -> list[ItemScore]:
        self.busy_since = time.monotonic()
        try:
            return await asyncio.to_thread(self.backend.score, items)
        finally:
            self.busy_since = None

    def check_health(self) -> None:
        """Called by Serve every few seconds; raising makes it replace this replica."""
        if self.busy_since is not None and time.monotonic() - self.busy_since > self.stuck_after_s:
            raise RuntimeError(f"a batch has run for over {self.stuck_after_s} s: the backend hangs")


class Ingress:
    def __init__(self, backend, config: dict, token: str):
        quiet_known_warnings()
        self.backend = backend
        self.config = ServiceConfig.from_dict(config)
        self.token = token.encode()
        self.penalties = Penalties(self.config.penalties)
        self.needs_reference: bool | None = None
        self.in_flight = 0
        self.draining = False
        self.requests: Counter[str] = Counter()  # served, rejected (503), refused (400/401/413), failed (500)
        self.items: Counter[str] = Counter()  # by final status; "resent": sent again after their replica died

    async def __call__(self, request: Request) -> JSONResponse:
        path, method = request.url.path.rstrip("/"), request.method
        if path == "/healthz" and method == "GET":
            if self.draining:
                return self.unavailable({"status": "draining"})
            return JSONResponse({"status": "ok"})
        if not self.authorised(request):
            self.requests["refused"] += 1
            return JSONResponse({"error": "a valid bearer token is required"}, 401, {"WWW-Authenticate": "Bearer"})
        if path == "/v1/stats" and method == "GET":
            return JSONResponse(self.stats())
        if path != "/v1/score" or method != "POST":
            return JSONResponse({"error": f"no route {method} {path}: POST /v1/score, GET /v1/stats, /healthz"}, 404)
        if self.draining:
            self.requests["rejected"] += 1
            return self.unavailable({"error": "the service is shutting down: retry later"})
        if self.in_flight >= self.config.max_queue:
            self.requests["rejected"] += 1
            return self.unavailable({"error": f"{self.in_flight} requests in flight: retry later"})
        self.in_flight += 1
        try:
            return await self.score_request(request)
        finally:
            self.in_flight -= 1

    async def score_request(self, request: Request) -> JSONResponse:
        started = time.perf_counter()
        try:
            body = await read_body(request, self.config.max_body_bytes)
        except TooLarge:
            self.requests["refused"] += 1
            return JSONResponse({"error": f"the body is over {self.config.max_body_mb} MiB: send fewer items"}, 413)
        if self.needs_reference is None:
            self.needs_reference = await self.backend.needs_reference.remote()
        try:
            items = await asyncio.to_thread(parse_request, body, self.config.max_items, self.needs_reference)
        except BadRequest as error:
            self.requests["refused"] += 1
            return JSONResponse({"error": str(error)}, 400)
        try:
            verdicts = await self.score_items(items, started + self.config.request_timeout_s)
            results = await asyncio.to_thread(self.combine, items, verdicts)
        except Exception as error:  # noqa: BLE001 - the request fails as a whole, said, and counted
            logger.exception("scoring failed")
            self.requests["failed"] += 1
            return JSONResponse({"error": one_line(error)}, 500)
        self.requests["served"] += 1
        self.items.update(result["status"] for result in results)
        return JSONResponse({"results": results, "latency_s": time.perf_counter() - started})

    async def score_items(self, items: list[ScoreItem], deadline: float) -> list[ItemScore]:
        tasks = [asyncio.ensure_future(self.score_item(item, deadline)) for item in items]
        await asyncio.wait(tasks, timeout=max(deadline - time.perf_counter(), 0))
        verdicts = []
        for task in tasks:
            if task.done():
                verdicts.append(task.result())
            else:
                task.cancel()
                timeout = self.config.request_timeout_s
                verdicts.append(ItemScore(None, "timeout", detail=f"not scored within {timeout} s"))
        return verdicts

    async def score_item(self, item: ScoreItem, deadline: float) -> ItemScore:
        for attempt in range(self.config.backend_retries + 1):
            try:
                return await self.backend.score.remote(item)
            except REPLICA_GONE as error:
                self.items["resent"] += 1
                if attempt == self.config.backend_retries or time.perf_counter() >= deadline:
                    return ItemScore(None, "error", detail=f"backend replica lost: {type(error).__name__}")
                await asyncio.sleep(min(0.5 * 2**attempt, max(deadline - time.perf_counter(), 0)))
            except Exception as error:  # noqa: BLE001 - a backend's failure masks its items, never scores them
                logger.warning("the backend failed on item %s", item.id, exc_info=error)
                return ItemScore(None, "error", detail=f"backend: {one_line(error)}")
        raise AssertionError("unreachable")

    def combine(self, items: list[ScoreItem], verdicts: list[ItemScore]) -> list[dict]:
        """Each item's reward: the backend's preference with the behavioural penalties applied."""
        results = []
        for item, verdict in zip(items, verdicts, strict=True):
            if verdict.status != "ok":
                results.append(result_json(item.id, None, verdict))
                continue
            try:
                report = self.penalties.assess(question_text(item.messages), answer_text(item.response))
                score = self.penalties.combine(verdict.preference, report)
            except Exception as error:  # noqa: BLE001 - the item is masked, said why; its batch goes on
                logger.exception("penalties failed on item %s", item.id)
                failed = ItemScore(None, "error", verdict.components, f"penalties: {type(error).__name__}: {error}")
                results.append(result_json(item.id, None, failed))
                continue
            verdict.components = {**verdict.components, **report.components}
            if report.fabricated:
                verdict.detail = f"fabricated citation(s): {report.fabricated}"
            results.append(result_json(item.id, score, verdict))
        return results

    async def drain(self, timeout_s: float) -> tuple[int, int]:
        """Refuses new requests from now on and waits up to `timeout_s` for those in flight to finish;
        returns (requests in flight when called, requests still in flight at the deadline)."""
        self.draining = True
        in_flight, deadline = self.in_flight, time.monotonic() + timeout_s
        while self.in_flight and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        return in_flight, self.in_flight

    def unavailable(self, body: dict) -> JSONResponse:
        return JSONResponse(body, 503, {"Retry-After": str(self.config.retry_after_s)})

    def authorised(self, request: Request) -> bool:
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), self.token)

    def stats(self) -> dict:
        return {"in_flight": self.in_flight, "requests": dict(self.requests), "items": dict(self.items)}


def one_line(error: Exception) -> str:
    """`Type: message`, the message's first line: what a reply's `detail` or `error` says. A failure inside a
    replica arrives as Ray's RayTaskError, whose text is the remote traceback in colour; its cause is the
    exception the backend raised."""
    cause = error.cause if isinstance(error, RayTaskError) else error
    message = str(cause).strip().partition("\n")[0]
    return f"{type(cause).__name__}: {message}" if message else type(cause).__name__


async def read_body(request: Request, limit: int) -> bytes:
    """The body, refusing one over `limit` bytes by its Content-Length or, without one, as it streams."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise TooLarge
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise TooLarge
        chunks.append(chunk)
    return b"".join(chunks)


def build_app(config: ServiceConfig, raw: dict, token: str):
    """The application `serve.run` starts: the ingress bound to `config.replicas` backend replicas."""
    batch = config.batch
    quiet = {"enable_access_log": False}  # a line per item and per request otherwise
    replica = serve.deployment(
        BackendReplica,
        name="backend",
        num_replicas=config.replicas,
        # Items wait in the replica's batch queue, not in Serve's router: a router holding them retries with
        # backoff, and a replica whose slots free up sits idle until a retry comes round.
        max_ongoing_requests=max(config.replica_max_items, batch.max_size),
        ray_actor_options={"num_cpus": config.replica_cpus, "num_gpus": config.replica_gpus},
        health_check_period_s=2,
        graceful_shutdown_timeout_s=5,  # items still in a replica told to stop are sent to another
        graceful_shutdown_wait_loop_s=0.2,  # Serve's 2 s would hold every shutdown for 2 s
        logging_config=quiet,
    )
    ingress = serve.deployment(
        Ingress,
        name="ingress",
        num_replicas=1,  # one place that bounds the queue and counts
        # The ingress itself refuses beyond max_queue: Serve must let those requests reach it.
        max_ongoing_requests=config.max_queue * 4 + 16,
        ray_actor_options={"num_cpus": 0},
        # Serve stops the ingress only when it shuts down, after drain_service has waited for the requests in
        # flight: what is still in flight then is cut off, and an idle ingress stops at once.
        graceful_shutdown_timeout_s=1,
        graceful_shutdown_wait_loop_s=0.1,
        logging_config=quiet,
    )
    # A batch that outlives two request timeouts is stuck: no request is waiting for it any more.
    backend = replica.bind(raw["rm"], batch.max_size, batch.wait_s, 2 * config.request_timeout_s)
    return ingress.bind(backend, raw, token)
