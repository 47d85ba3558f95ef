"""The reward-model service on loopback (rl/rm_service/): its guards, its queue, its timeouts, a replica
killed under load, and the client's retries, against one Ray Serve application whose backend does what
each item's response says (tests/rl/rm_stubs.py). Every wait in these tests has a bound."""

import base64
import io
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import ray
import requests
from PIL import Image
from ray import serve

from rl.rewards.rm_client import RewardModelClient, ServiceClientConfig, ServiceRefused
from rl.rewards.types import RewardRequest
from rl.rm_service.config import ServiceConfig, read_token
from rl.rm_service.launch import start_service
from step3vl_train.train.distributed import free_port
from step3vl_train.usage import UsageError
from tests.conftest import REPO

TOKEN = "test-token-0123456789abcdef"
REQUEST_TIMEOUT_S = 4.0
MAX_QUEUE = 4


@pytest.fixture(scope="module")
def service():
    raw = {
        "port": 0,
        "max_body_mb": 0.25,
        "max_queue": MAX_QUEUE,
        "request_timeout_s": REQUEST_TIMEOUT_S,
        "replicas": 2,
        "replica_cpus": 0,
        "batch": {"max_size": 8, "wait_s": 0.05},
        "rm": {"backend": "tests.rl.rm_stubs:ScriptedBackend", "options": {"preference": 0.8}},
    }
    config = ServiceConfig.from_dict(raw)
    # Replicas import the scripted backend from the repository; include_dashboard off keeps start-up short.
    ray.init(address="local", num_cpus=4, include_dashboard=False, runtime_env={"env_vars": {"PYTHONPATH": str(REPO)}})
    try:
        yield start_service(config, raw, TOKEN, ready_timeout_s=120)
    finally:
        serve.shutdown()
        ray.shutdown()


def item(index, response="An answer.", **extra) -> dict:
    return {"id": str(index), "messages": [{"role": "user", "content": "Say something."}], "response": response} | extra


def post(url, items, token=TOKEN, timeout=30, **kwargs):
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return requests.post(f"{url}/v1/score", json={"items": items}, headers=headers, timeout=timeout, **kwargs)


def client(url, **overrides) -> RewardModelClient:
    settings = {"url": url, "deadline_s": 60, "backoff_s": 0.2, "max_backoff_s": 1.0} | overrides
    return RewardModelClient(ServiceClientConfig(**settings), token=TOKEN)


def request(response: str) -> RewardRequest:
    return RewardRequest(response=response, reward="reward_model", messages=[{"role": "user", "content": "Hi."}])


def stats(url) -> dict:
    return requests.get(f"{url}/v1/stats", headers={"Authorization": f"Bearer {TOKEN}"}, timeout=10).json()


def test_scores_each_item_with_its_penalties(service):
    image = io.BytesIO()
    Image.new("RGB", (32, 32), "red").save(image, format="PNG")
    items = [
        item(0),
        item(1, "See https://made-up.example-journal.org/paper for details."),  # not in the prompt: fabricated
        item(
            2,
            "It is red.",
            messages=[{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Colour?"}]}],
            images=[base64.b64encode(image.getvalue()).decode()],
        ),
    ]
    reply = post(service, items)
    assert reply.status_code == 200, reply.text
    results = {r["id"]: r for r in reply.json()["results"]}
    assert [r["status"] for r in results.values()] == ["ok"] * 3
    assert results["0"]["score"] == pytest.approx(0.8)
    assert results["0"]["components"]["rm"] == pytest.approx(0.8)
    assert results["0"]["components"]["language"] == 0.0
    assert results["1"]["score"] == 0.0 and results["1"]["components"]["fabricated_citations"] == 1
    assert "fabricated" in results["1"]["detail"]
    assert results["2"]["score"] == pytest.approx(0.8)


def test_health_needs_no_token_and_everything_else_does(service):
    assert requests.get(f"{service}/healthz", timeout=10).json() == {"status": "ok"}
    for token in (None, "wrong-token-0123456789"):
        reply = post(service, [item(0)], token=token)
        assert reply.status_code == 401 and reply.headers["WWW-Authenticate"] == "Bearer"
    assert requests.get(f"{service}/v1/stats", timeout=10).status_code == 401
    assert stats(service)["requests"]["refused"] >= 3


def test_a_body_over_the_limit_gets_413_unread(service):
    reply = post(service, [item(0, "x" * 400_000)])
    assert reply.status_code == 413
    # Without a Content-Length the limit holds as the body streams in.
    chunks = (b'{"items": [' + b" " * 100_000 for _ in range(4))
    reply = requests.post(f"{service}/v1/score", data=chunks, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=30)
    assert reply.status_code == 413


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"{not json", "the body is not JSON"),
        (b'{"items": {}}', '"items"'),
        (b'{"items": [{"id": "a", "response": "x", "messages": [{"role": "user", "content": "q"}]}, 7]}', "item 1"),
        (b'{"items": [{"messages": [{"role": "user", "content": "q"}]}]}', "item 0: response must be a string"),
        (
            b'{"items": [{"id": "x", "response": "r", "messages": [{"role": "robot", "content": "q"}]}]}',
            "item 0 (id 'x'): bad_schema",
        ),
        (
            b'{"items": [{"response": "r", "messages": [{"role": "user", "content": [{"type": "image"}]}]}]}',
            "item 0: missing_image",
        ),
        (
            b'{"items": [{"response": "r", "images": ["%%%"], "messages": [{"role": "user", "content": "q"}]}]}',
            "item 0: images[0] is not base64",
        ),
        (b'{"items": [{"response": "r", "score": 1, "messages": [{"role": "user", "content": "q"}]}]}', "score"),
        (b"[" * 100_000 + b"]" * 100_000, "the body nests deeper than the parser goes"),
        (b'{"items": [{"id": ' + b"9" * 5000 + b"}]}", "the body is not JSON"),
    ],
    ids=lambda value: value[:40] if isinstance(value, bytes) else None,
)
def test_a_malformed_request_gets_400_naming_the_item(service, body, message):
    reply = requests.post(
        f"{service}/v1/score",
        data=body,
        headers={"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"},
        timeout=30,
    )
    assert reply.status_code == 400
    assert message in reply.json()["error"]


def test_beyond_the_queue_503_with_retry_after_and_the_client_retries(service):
    with ThreadPoolExecutor(3 * MAX_QUEUE) as pool:
        replies = list(pool.map(lambda i: post(service, [item(i, "sleep:1.5")]), range(3 * MAX_QUEUE)))
    codes = sorted(r.status_code for r in replies)
    assert codes.count(200) >= MAX_QUEUE and 503 in codes, codes
    assert all(r.headers["Retry-After"] == "1" for r in replies if r.status_code == 503)
    rejected_before = stats(service)["requests"]["rejected"]
    assert rejected_before >= codes.count(503)

    scorer = client(service, items_per_request=1, concurrency=3 * MAX_QUEUE)
    results = scorer.score([request("sleep:1") for _ in range(3 * MAX_QUEUE)])
    assert [r.status for r in results] == ["ok"] * (3 * MAX_QUEUE)
    assert scorer.stats.rejected > 0 and scorer.stats.retries >= scorer.stats.rejected
    assert stats(service)["requests"]["rejected"] > rejected_before


def test_the_client_masks_what_the_deadline_leaves_unscored(service):
    started = time.monotonic()
    results = client(service, deadline_s=2.0, request_timeout_s=1.0).score([request("sleep:3")])
    assert results[0].status == "timeout" and not results[0].valid
    assert time.monotonic() - started < 5


def test_a_wrong_token_stops_the_client_with_a_message(service):
    scorer = RewardModelClient(ServiceClientConfig(url=service), token="wrong-token-0123456789")
    with pytest.raises(ServiceRefused, match="refused the token"):
        scorer.score([request("An answer.")])


def test_an_unreachable_service_is_retried_until_the_deadline(service):
    started = time.monotonic()
    dead = f"http://127.0.0.1:{free_port()}"
    results = client(dead, deadline_s=1.5, backoff_s=0.1).score([request("x"), request("y")])
    assert [r.status for r in results] == ["timeout", "timeout"]
    assert time.monotonic() - started < 4


def test_a_crashing_backend_masks_its_batch_and_the_service_goes_on(service):
    results = client(service, items_per_request=4).score([request("crash"), request("fine")])
    assert results[0].status == "error" and "crashed" in results[0].detail and not results[0].valid
    assert all(r.status in ("ok", "error") for r in results)
    assert client(service).score([request("fine")])[0].status == "ok"


def test_a_backend_failure_comes_back_as_one_plain_line(service):
    reply = post(service, [item(0, "crash")])
    assert reply.status_code == 200
    (result,) = reply.json()["results"]
    # Not Ray's RayTaskError, whose text is the remote traceback in ANSI colours.
    assert result["status"] == "error" and result["detail"] == "backend: RuntimeError: the backend crashed"


def test_a_replica_killed_under_load_loses_no_item_and_counts_none_twice(service):
    """Up to 3 tries: a kill that lands between batches (a loaded machine's timing) catches nothing in flight
    and proves nothing about resending; every try must still lose and double-count no item."""
    for _ in range(3):
        before = stats(service)["items"]
        scorer = client(service, items_per_request=4, concurrency=8)
        requests_ = [request("sleep:0.3") for _ in range(96)]
        box = {}
        load = threading.Thread(target=lambda box=box, scorer=scorer, requests_=requests_: box.update(
            results=scorer.score(requests_)))  # fmt: skip
        load.start()
        time.sleep(0.7)
        replicas = [a for a in ray.util.list_named_actors(all_namespaces=True) if "backend" in a["name"]]
        ray.kill(ray.get_actor(replicas[0]["name"], namespace=replicas[0]["namespace"]), no_restart=False)
        load.join(timeout=90)
        assert not load.is_alive()
        results = box["results"]
        assert len(results) == len(requests_)
        assert {r.status for r in results} <= {"ok", "error", "timeout"}
        assert sum(r.status == "ok" for r in results) >= len(requests_) // 2
        after = stats(service)["items"]
        counted = sum(n for status, n in after.items() if status != "resent") - sum(
            n for status, n in before.items() if status != "resent"
        )
        assert counted == len(requests_)  # each item once, whatever happened to its replica
        if after.get("resent", 0) > before.get("resent", 0):  # the kill caught items in flight
            return
    pytest.fail("in 3 tries no kill caught an item in flight")


def test_a_hanging_backend_times_out_within_its_bound(service):
    started = time.monotonic()
    reply = post(service, [item(0, "sleep:30"), item(1)])
    elapsed = time.monotonic() - started
    assert reply.status_code == 200
    statuses = {r["id"]: r["status"] for r in reply.json()["results"]}
    assert statuses["0"] == "timeout"
    assert elapsed < REQUEST_TIMEOUT_S + 3


def test_the_token_is_read_from_the_environment_or_a_file_only(tmp_path, monkeypatch):
    monkeypatch.delenv("STEP3VL_RM_TOKEN", raising=False)
    with pytest.raises(UsageError, match="needs a bearer token on loopback"):
        read_token(ServiceConfig())
    with pytest.raises(UsageError, match="beyond loopback"):
        read_token(ServiceConfig(host="0.0.0.0"))
    (tmp_path / "token").write_text(TOKEN + "\n")
    assert read_token(ServiceConfig(host="0.0.0.0", token_file=str(tmp_path / "token"))) == TOKEN
    monkeypatch.setenv("STEP3VL_RM_TOKEN", "short")
    with pytest.raises(UsageError, match="at least 16"):
        read_token(ServiceConfig())


def test_an_rl_run_checks_the_service_and_its_token_before_it_starts(service, monkeypatch):
    from rl.preflight import PreflightError, check_reward_service
    from tests.rl.compose import compose_rl

    def config(url):
        return compose_rl(
            "stage=rlhf", "model=tiny", "processor=tiny", "reward.service.launch=false", f"reward.service.url={url}"
        )

    monkeypatch.setenv("STEP3VL_RM_TOKEN", TOKEN)
    check_reward_service(config(service))
    with pytest.raises(PreflightError, match="does not answer"):
        check_reward_service(config(f"http://127.0.0.1:{free_port()}"))
    monkeypatch.setenv("STEP3VL_RM_TOKEN", "wrong-token-0123456789")
    with pytest.raises(PreflightError, match="refuses the token in STEP3VL_RM_TOKEN"):
        check_reward_service(config(service))
    with pytest.raises(PreflightError, match="set reward.service.url"):
        check_reward_service(compose_rl("stage=rlhf", "model=tiny", "processor=tiny", "reward.service.launch=false"))
