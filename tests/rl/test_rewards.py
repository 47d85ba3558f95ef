import http.server
import json
import threading
import time

import pytest

from rl.rewards import RewardConfig, RewardRequest, RewardScorer
from rl.rewards.answer import boxed_contents, split_reasoning
from rl.rewards.verifier import VerifierConfig

T = "Some reasoning.</think>"


@pytest.fixture(scope="module")
def scorer():
    scorer = RewardScorer(RewardConfig(num_workers=2, timeout_s=5.0))
    yield scorer
    scorer.close()


def score(scorer, response, reward, answer=None, **fields):
    [result] = scorer.score([RewardRequest(response, reward, answer=answer, **fields)])
    return result.score, result.status


MATH = [
    (T + r"\boxed{\frac{1}{2}}", "0.5", 1.0),
    (T + r"\boxed{0.5}", r"\frac{1}{2}", 1.0),
    (T + r"\boxed{\frac{2}{4}}", "1/2", 1.0),
    (T + r"\boxed{0.333}", "1/3", 0.0),
    (T + r"\boxed{5\text{ cm}}", "5", 1.0),
    (T + r"\boxed{5 cm}", "5", 1.0),
    (T + r"\boxed{(1, 2]}", "(1,2]", 1.0),
    (T + r"\boxed{[1, 2]}", "(1,2]", 0.0),
    (T + r"\boxed{x = 2}", "2", 1.0),
    (T + r"The answer is \frac{3}{4}.", "0.75", 1.0),
    (T + "so it is 1579", "1579", 1.0),
    (T + r"\boxed{\sqrt{2}/2}", r"\frac{\sqrt{2}}{2}", 1.0),
    (r"\boxed{7}</think>\boxed{8}", "7", 0.0),  # only the text after the last </think> answers
    (T + r"\boxed{1,000}", "1000", 1.0),
]


@pytest.mark.parametrize(("response", "answer", "expected"), MATH)
def test_math_equivalences(scorer, response, answer, expected):
    assert score(scorer, response, "math", answer) == (expected, "ok")


@pytest.mark.parametrize(
    ("response", "status"),
    [
        (T + r"\boxed{3} or \boxed{4}", "multiple_answers"),
        (T + r"\boxed{3", "no_answer"),  # never closed
        (T + r"\boxed{}", "no_answer"),
        (T + "   ", "no_answer"),
        (r"\boxed{3}", "no_reasoning"),  # no </think>
        (r"</think>\boxed{3}", "no_reasoning"),  # nothing before it
    ],
)
def test_math_guards(scorer, response, status):
    assert score(scorer, response, "math", "3") == (0.0, status)


def test_truncated_response_scores_the_configured_value(scorer):
    assert score(scorer, T + r"\boxed{3}", "math", "3", truncated=True) == (0.0, "truncated")


def test_reasoning_is_optional_when_configured():
    scorer = RewardScorer(RewardConfig(num_workers=1, require_reasoning=False))
    try:
        assert score(scorer, r"\boxed{3}", "math", "3") == (1.0, "ok")
    finally:
        scorer.close()


@pytest.mark.parametrize(
    ("reward", "response", "answer", "expected"),
    [
        ("choice", T + "B", "B", 1.0),
        ("choice", T + "(c)", "C", 1.0),
        ("choice", T + r"\boxed{D}", "D", 1.0),
        ("choice", T + "B. a cat", "B", 1.0),
        ("choice", T + "A", "B", 0.0),
        ("counting", T + "There are 7.", "7", 1.0),
        ("counting", T + "seven", "7", 1.0),
        ("counting", T + r"\boxed{12}", "12", 1.0),
        ("counting", T + "3 then 4", "3", 0.0),
        ("numeric", T + "about 3.14", "3.1416", 1.0),  # within the default 1% relative tolerance
        ("numeric", T + "1,234.5", "1234", 1.0),
        ("numeric", T + "3.3", "3.1416", 0.0),
        ("numeric", T + "-2e3", "-2000", 1.0),
    ],
)
def test_choice_counting_and_numeric(scorer, reward, response, answer, expected):
    assert score(scorer, response, reward, answer) == (expected, "ok")


IMAGE = (1000, 500)
BOX = [[100, 100, 300, 200]]  # pixels


@pytest.mark.parametrize(
    ("response", "expected"),
    [
        (T + "<box>[100, 200, 300, 400]</box>", 1.0),  # 0-1000 normalised: x by 1000 px, y by 500 px
        (T + "[100, 200, 300, 400] and [500, 500, 600, 600]", 0.5),  # an extra box halves it
        (T + "[100, 200, 200, 400]", 0.5),  # IoU 0.5: at the threshold, scores its IoU
        (T + "[100, 200, 180, 400]", 0.0),  # IoU 0.4: below the threshold
        (T + "[300, 200, 100, 400]", 0.0),  # inverted
        (T + "[1100, 200, 1300, 400]", 0.0),  # off the image
    ],
)
def test_grounding_iou_in_normalised_coordinates(scorer, response, expected):
    result = score(scorer, response, "grounding", boxes=BOX, image_size=IMAGE)
    assert result[1] == "ok"
    assert result[0] == pytest.approx(expected)


def test_grounding_threshold_and_pixel_coordinates():
    options = {"grounding": {"coords": "pixels", "iou_threshold": 0.3}}
    scorer = RewardScorer(RewardConfig(num_workers=1, options=options))
    try:
        # half the reference box: IoU 0.5, above 0.3, scores its IoU
        assert score(scorer, T + "[100, 100, 200, 200]", "grounding", boxes=BOX, image_size=IMAGE) == (0.5, "ok")
        assert score(scorer, T + "[100, 100, 150, 200]", "grounding", boxes=BOX, image_size=IMAGE) == (0.0, "ok")
        assert score(scorer, T + "[1, 2, 3]", "grounding", boxes=BOX, image_size=IMAGE) == (0.0, "no_answer")
    finally:
        scorer.close()


@pytest.mark.parametrize(
    ("response", "expected"),
    [
        (T + "(200, 300)", 1.0),  # the centre, normalised: (200 px, 150 px)
        (T + "[200, 300]", 1.0),
        (T + "(250, 300)", pytest.approx(1 - 50 / (223.6068 / 2), abs=1e-4)),
        (T + "(400, 300)", 0.0),  # beyond half the box diagonal
        (T + "(1200, 300)", 0.0),  # off the image
    ],
)
def test_pointing_decays_with_distance(scorer, response, expected):
    fields = {"boxes": BOX, "points": [[200, 150]], "image_size": IMAGE}
    assert score(scorer, response, "pointing", **fields) == (expected, "ok")


def test_user_reward_by_import_path(scorer):
    assert score(scorer, T + "yes", "tests.rl.user_rewards:exact", "yes") == (1.0, "ok")
    assert score(scorer, T + "yes", "no_such_module:fn", "yes")[1] == "error"


def test_a_hanging_reward_is_a_timeout_and_the_pool_goes_on():
    scorer = RewardScorer(RewardConfig(num_workers=2, timeout_s=1.0))
    try:
        started = time.monotonic()
        requests = [
            RewardRequest(T + "x", "tests.rl.user_rewards:hang"),
            RewardRequest(T + "x", "tests.rl.user_rewards:crash"),
            RewardRequest(T + "x", "tests.rl.user_rewards:out_of_range"),
            RewardRequest(T + r"\boxed{4}", "math", answer="4"),
        ]
        results = scorer.score(requests)
        assert time.monotonic() - started < 10
        assert [r.status for r in results] == ["timeout", "error", "error", "ok"]
        assert [r.valid for r in results] == [False, False, False, True]
        assert scorer.score([RewardRequest(T + r"\boxed{4}", "math", answer="4")])[0].score == 1.0
    finally:
        scorer.close()


def test_config_fn_overrides_every_sample():
    scorer = RewardScorer(RewardConfig(num_workers=1, fn="tests.rl.user_rewards:exact"))
    try:
        assert score(scorer, T + "7", "math", "7") == (1.0, "ok")
    finally:
        scorer.close()


def test_answer_helpers():
    assert split_reasoning("a</think>b</think>c") == ("a</think>b", "c")
    assert boxed_contents(r"\boxed{\frac{1}{2}} and \boxed{x^{2}}") == [r"\frac{1}{2}", "x^{2}"]


class VerifierHandler(http.server.BaseHTTPRequestHandler):
    mode = "ok"
    calls = 0

    def do_POST(self):  # noqa: N802 - http.server's naming
        type(self).calls += 1
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if self.mode == "slow":
            time.sleep(2)
        if self.mode == "error":
            self.send_response(500)
            self.end_headers()
            return
        prompt = body["messages"][0]["content"]
        verdict = "CORRECT" if "REFERENCE: 42" in prompt and "RESPONSE: forty-two" in prompt else "INCORRECT"
        if self.mode == "garbled":
            verdict = "maybe"
        reply = {
            "id": "x",
            "object": "chat.completion",
            "created": 0,
            "model": body["model"],
            "choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": verdict}}],
        }
        data = json.dumps(reply).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture
def endpoint():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), VerifierHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()


@pytest.mark.parametrize(
    ("mode", "expected"),
    [
        ("ok", [(1.0, "ok"), (0.0, "ok")]),
        ("error", [(0.0, "error")] * 2),
        ("slow", [(0.0, "timeout")] * 2),
        ("garbled", [(0.0, "error")] * 2),
    ],
)
def test_verifier_endpoint(endpoint, mode, expected):
    VerifierHandler.mode, VerifierHandler.calls = mode, 0
    config = RewardConfig(verifier=VerifierConfig(base_url=endpoint, timeout_s=0.5, max_retries=1, max_concurrency=2))
    scorer = RewardScorer(config)
    try:
        requests = [RewardRequest(T + "forty-two", "verifier", answer=a, prompt="?") for a in ("42", "41")]
        assert [(r.score, r.status) for r in scorer.score(requests)] == expected
    finally:
        scorer.close()
    if mode in ("error", "slow"):
        assert VerifierHandler.calls == 4  # each request tried twice (one retry)


def test_verifier_needs_an_endpoint():
    scorer = RewardScorer(RewardConfig(num_workers=1))
    try:
        with pytest.raises(ValueError, match="base_url"):
            scorer.score([RewardRequest(T + "x", "verifier", answer="x")])
    finally:
        scorer.close()


def test_verifier_scores_answers_the_rules_cannot_read(endpoint):
    VerifierHandler.mode, VerifierHandler.calls = "ok", 0
    config = RewardConfig(num_workers=1, verifier_fallback=["math"], verifier=VerifierConfig(base_url=endpoint))
    scorer = RewardScorer(config)
    try:
        requests = [
            RewardRequest(T + "forty-two", "math", answer="42"),  # math-verify reads no number: the verifier does
            RewardRequest(T + "many", "counting", answer="3"),  # not a fallback reward: stays no_answer
            RewardRequest(T + r"\boxed{41}", "math", answer="42"),  # read by the rule: never sent
        ]
        assert [(r.score, r.status) for r in scorer.score(requests)] == [(1.0, "ok"), (0.0, "no_answer"), (0.0, "ok")]
    finally:
        scorer.close()
    assert VerifierHandler.calls == 1


@pytest.mark.parametrize(
    ("fallback", "base_url", "match"), [(["math"], None, "base_url"), (["nonsense"], "http://x/v1", "unknown")]
)
def test_verifier_fallback_is_checked_at_start(fallback, base_url, match):
    config = RewardConfig(verifier_fallback=fallback, verifier=VerifierConfig(base_url=base_url))
    with pytest.raises((ValueError, KeyError), match=match):
        RewardScorer(config)
