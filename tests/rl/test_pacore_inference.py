"""PaCoRe inference (rl/pacore/inference.py, launch/pacore.py): the round loop against an OpenAI-compatible
endpoint served on loopback, which records every call; and the command end to end with the transformers
engine on the tiny model."""

import base64
import io
import json
import os
import random
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
from PIL import Image

from rl.chat_models import build_chat_model
from rl.pacore.inference import InferenceConfig, run_inference
from rl.pacore.messages import seeded_order
from rl.pacore.template import render
from step3vl_train.data.sources import record_key
from step3vl_train.processing.chat import split_reasoning
from step3vl_train.processing.tokenizer import load_tokenizer
from step3vl_train.usage import UsageError, build
from tests.conftest import REPO
from tests.rl.chat_endpoint import chat_endpoint

SYNTHESIS_START = "You are given a problem and a list of reference responses."


def png(color: str) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (64, 48), color).save(buffer, format="PNG")
    return buffer.getvalue()


def user_text(message: dict) -> str:
    content = message["content"]
    return content if isinstance(content, str) else "".join(p["text"] for p in content if p["type"] == "text")


def question_of(body: dict) -> str:
    """The problem a call is about: its question's first line (a synthesis prompt quotes it)."""
    text = user_text(body["messages"][-1])
    if text.startswith(SYNTHESIS_START):
        text = text.split("Original Problem:\n", 1)[1]
    return text.splitlines()[0]


def is_synthesis(body: dict) -> bool:
    return user_text(body["messages"][-1]).startswith(SYNTHESIS_START)


def references(body: dict) -> list[str]:
    """The reference responses a synthesis call was shown, in order."""
    text = user_text(body["messages"][-1])
    listed = text.split("Reference Responses:\n", 1)[1].rsplit("\n\n\nNow, based on", 1)[0]
    return [part.split("\n", 1)[1].rstrip("\n") for part in listed.split("\nReference ")[1:]]


@dataclass
class Endpoint:
    """Replies `respond(body, index)` (index: the call's number, from 0), keeps every call's body."""

    respond: Callable[[dict, int], tuple]
    bodies: list[dict] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def answer(self, body: dict) -> tuple:
        with self.lock:
            self.bodies.append(body)
            index = len(self.bodies) - 1
        return self.respond(body, index)

    def calls(self) -> Counter:
        """Calls by (problem, synthesis or not)."""
        return Counter((question_of(body), is_synthesis(body)) for body in self.bodies)


def distinct_answers(body: dict, index: int) -> tuple:
    """Rollouts of different lengths, each its own; the synthesis boxes 7."""
    if is_synthesis(body):
        return 200, "All agree: \\boxed{7}", "I read the references."
    return 200, f"Answer {index}{'!' * (index * 7 % 11)}: \\boxed{{{7 if index % 2 else 3}}}", "Let me think."


def write_problems(tmp_path, problems: list[dict]) -> str:
    """`problems`: (question, image colour or None, earlier turns) as dicts; JSONL with images beside it."""
    lines = []
    for index, problem in enumerate(problems):
        content: list[dict] = [{"type": "text", "text": problem["question"]}]
        record = {"key": f"p{index}", "answer": "7", "reward": "math"}
        if problem.get("image"):
            (tmp_path / f"p{index}.png").write_bytes(png(problem["image"]))
            content = [{"type": "image"}, *content]
            record["images"] = [f"p{index}.png"]
        record["messages"] = [*problem.get("turns", []), {"role": "user", "content": content}]
        lines.append(json.dumps(record))
    path = tmp_path / "problems.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return str(path)


@dataclass
class Counting:
    """The chat model, its calls counted: (requests, replies a request) of each."""

    model: Any
    calls: list[tuple[int, int]] = field(default_factory=list)

    def complete(self, requests, n=1, seed=0):
        self.calls.append((len(requests), n))
        return self.model.complete(requests, n, seed)

    def close(self):
        self.model.close()


def infer(tmp_path, url: str, data: str, timeout_s=5.0, batch_problems=16, calls=None, **pacore):
    endpoint = {"base_url": url, "model": "policy", "timeout_s": timeout_s, "max_retries": 0}
    values = {
        "chat": {"backend": "openai", "endpoint": endpoint, "tokenizer": "tiny", "max_new_tokens": 64},
        "data": {"paths": data},
        "out": str(tmp_path / "out"),
        "batch_problems": batch_problems,
        "pacore": pacore,
        "reward": {"num_workers": 1},
    }
    config = build(InferenceConfig, values)
    model = Counting(build_chat_model(config.chat))
    try:
        summary = run_inference(config, model, load_tokenizer("tiny"))
    finally:
        model.close()
    results = [json.loads(line) for line in (tmp_path / "out" / "results.jsonl").read_text().splitlines()]
    assert json.loads((tmp_path / "out" / "summary.json").read_text()) == summary
    if calls is not None:
        assert model.calls == calls
    return summary, results


PROBLEMS = [
    {"question": "Q0: which digit is drawn?", "image": "red"},
    {"question": "Q1: which digit is it?"},
    {"question": "Q2: and now?", "image": "blue"},
]


def test_k_rollouts_then_one_synthesis_with_the_images_and_failed_calls_dropped(tmp_path):
    def respond(body, index):
        if not is_synthesis(body) and index % 4 == 1:
            return (500, None, None)  # with max_retries=0: one call, failed
        return distinct_answers(body, index)

    endpoint = Endpoint(respond)
    with chat_endpoint(endpoint.answer) as url:
        summary, results = infer(tmp_path, url, write_problems(tmp_path, PROBLEMS), calls=[(3, 4), (3, 1)], rounds=[4])
    assert endpoint.calls() == {(p["question"], s): 1 if s else 4 for p in PROBLEMS for s in (False, True)}
    assert summary["calls"] == 15 and summary["problems"] == 3
    failed = sum(r["status"] != "ok" for result in results for r in result["rounds"][0])
    assert failed > 0 and summary["dropped"] == {"failed": failed}

    bodies = {question_of(b): b for b in endpoint.bodies if is_synthesis(b)}
    for problem, result in zip(PROBLEMS, results, strict=True):
        first, final = result["rounds"]
        ok = [i for i, r in enumerate(first) if r["status"] == "ok"]
        assert all(first[i]["status"] == "error" and first[i]["conclusion"] is None for i in set(range(4)) - set(ok))
        [synthesis] = result["syntheses"]
        assert sorted(synthesis["references"]) == ok  # every rollout that came back, none that failed
        shown = references(bodies[problem["question"]])
        assert shown == [first[i]["conclusion"] for i in synthesis["references"]] and all(shown)
        # The rendered template replaced the question's text; the image stayed where it was.
        [message] = bodies[problem["question"]]["messages"]
        parts = message["content"]
        assert [p["type"] for p in parts] == (["image_url", "text"] if problem.get("image") else ["text"])
        assert parts[-1]["text"] == render(problem["question"], shown)
        if problem.get("image"):
            url = parts[0]["image_url"]["url"]
            assert url.startswith("data:image/png;base64,")
            assert base64.b64decode(url.partition(",")[2]) == png(problem["image"])
        assert final == [{"conclusion": "All agree: \\boxed{7}", "finished": True, "status": "ok",
                          "finish_reason": "stop"}]  # fmt: skip
        assert result["final"]["text"] == "All agree: \\boxed{7}"
        assert result["final"]["reasoning"] == "I read the references."

    # SeRe and PaCoRe scored side by side: odd calls box 7, the synthesis always does; a failed call
    # answered nothing, and scores 0.
    sere = [r["score"] for result in results for r in result["sere_rewards"]]
    assert len(sere) == 12 and summary["sere_scored"] == 12
    assert summary["sere_accuracy"] == pytest.approx(sum(sere) / 12) and 0 < summary["sere_accuracy"] < 1
    assert summary["pacore_accuracy"] == 1.0 and summary["pacore_scored"] == 3
    assert all(r["status"] == "error" and r["score"] == 0.0
               for result in results for r, c in zip(result["sere_rewards"], result["rounds"][0], strict=True)
               if c["status"] != "ok")  # fmt: skip


def test_the_official_order_and_two_coordinated_rounds(tmp_path):
    def respond(body, index):
        if not is_synthesis(body) and index % 5 == 2:
            return (500, None, None)
        return distinct_answers(body, index)

    endpoint = Endpoint(respond)
    with chat_endpoint(endpoint.answer) as url:
        summary, results = infer(tmp_path, url, write_problems(tmp_path, PROBLEMS), batch_problems=2,
                                 calls=[(2, 5), (2, 3), (2, 1), (1, 5), (1, 3), (1, 1)], rounds=[5, 3],
                                 order="official")  # fmt: skip
    assert endpoint.calls() == {(p["question"], s): 4 if s else 5 for p in PROBLEMS for s in (False, True)}
    assert summary["calls"] == 3 * (5 + 3 + 1) == len(endpoint.bodies)
    assert summary["dropped"]["failed"] == 3
    synthesis_calls = [b for b in endpoint.bodies if is_synthesis(b)]
    assert len(synthesis_calls) == 3 * (3 + 1)
    for problem, result in zip(PROBLEMS, results, strict=True):
        assert [len(replies) for replies in result["rounds"]] == [5, 3, 1]
        # The official code's order: the round's contents, failed ones as empty strings, sorted by length,
        # then random.Random(42).shuffle; the empty ones left out afterwards.
        shown = [
            references(body) for body in synthesis_calls if question_of(body) == problem["question"]
        ]  # the second round's 3 calls show the first round's 5; the last call shows the second round's 3
        for round_index, (given, rendered) in enumerate(zip(result["syntheses"], [shown[0], shown[-1]], strict=True)):
            contents = [r["conclusion"] or "" for r in result["rounds"][round_index]]
            expected = sorted(contents, key=len)
            random.Random(42).shuffle(expected)
            assert rendered == [content for content in expected if content]
            assert [contents[i] for i in given["references"]] == rendered
        assert shown[0] == shown[1] == shown[2]  # one compaction feeds all calls of the next round


def test_a_shuffled_order_is_seeded_per_problem_and_earlier_turns_are_kept(tmp_path):
    turns = [{"role": "user", "content": "Remember the digit 7."}, {"role": "assistant", "content": "I will."}]
    problems = [{"question": "Q0: which digit?", "turns": turns}, {"question": "Q1: which digit?", "turns": turns}]
    endpoint = Endpoint(distinct_answers)
    with chat_endpoint(endpoint.answer) as url:
        _, results = infer(tmp_path, url, write_problems(tmp_path, problems), rounds=[6])
    for body in endpoint.bodies:
        assert body["messages"][:2] == turns
        assert len(body["messages"]) == 3
    syntheses = [b for b in endpoint.bodies if is_synthesis(b)]
    assert len(syntheses) == 2
    for result in results:  # seeded by pacore.seed, the problem's key and the round
        assert result["syntheses"][0]["references"] == seeded_order(6, 0, record_key(result["key"]), 0)


def test_timeouts_unfinished_and_empty_rollouts_are_dropped_and_none_left_is_the_bare_problem(tmp_path):
    seen, lock = Counter(), threading.Lock()

    def respond(body, index):
        if is_synthesis(body):
            return 200, "\\boxed{7}", "So."
        question = question_of(body)
        with lock:
            seen[question] += 1
            count = seen[question]
        if question.startswith("Q0") and count <= 6:  # the 6 rollouts fail, 2 in each way; then the synthesis
            if count % 3 == 0:
                time.sleep(4.0)  # past the client's timeout
                return 200, "too late", "x"
            if count % 3 == 1:
                return 200, "half a thou", "Thinking a long", "length"
            return 200, "   ", "Thought."
        return 200, "\\boxed{7}", "Thought."

    endpoint = Endpoint(respond)
    with chat_endpoint(endpoint.answer) as url:
        # a timeout a loaded 2-core machine's prompt replies stay well within
        summary, results = infer(tmp_path, url, write_problems(tmp_path, PROBLEMS[:2]), timeout_s=2.0, rounds=[6])
    bare, normal = results
    statuses = Counter(r["status"] for r in bare["rounds"][0])
    assert statuses["timeout"] == 2 and statuses["ok"] == 4
    assert bare["syntheses"][0]["references"] == [] and bare["syntheses"][0]["no_messages"]
    assert bare["syntheses"][0]["dropped"] == {"failed": 2, "unfinished": 2, "empty": 2}
    q0_calls = [b for b in endpoint.bodies if question_of(b).startswith("Q0")]
    assert len(q0_calls) == 7 and not any(is_synthesis(b) for b in q0_calls)
    assert user_text(q0_calls[-1]["messages"][-1]) == PROBLEMS[0]["question"]  # the template bypassed
    assert bare["final"]["conclusion"] == "\\boxed{7}"
    assert len(normal["syntheses"][0]["references"]) == 6
    assert summary["no_messages"] == 1
    assert summary["dropped"] == {"failed": 2, "unfinished": 2, "empty": 2}
    # A reply cut at the length limit scores as truncated, not by its answer.
    rewards = zip(bare["sere_rewards"], bare["rounds"][0], strict=True)
    assert [r["status"] for r, c in rewards if c["finish_reason"] == "length"] == ["truncated"] * 2


def test_over_budget_skip_gives_the_problem_no_synthesis(tmp_path):
    endpoint = Endpoint(distinct_answers)
    with chat_endpoint(endpoint.answer) as url:
        summary, [result] = infer(tmp_path, url, write_problems(tmp_path, PROBLEMS[1:2]), rounds=[3],
                                  max_synthesis_tokens=40, over_budget="skip")  # fmt: skip
    assert len(endpoint.bodies) == 3 and not any(is_synthesis(b) for b in endpoint.bodies)
    assert result["skipped"] == "over_budget" and result["final"] is None
    assert result["pacore_reward"] == {"score": 0.0, "status": "skipped"}  # no answer: wrong
    assert result["syntheses"][0]["dropped"] == {"over_budget": 3}
    assert summary["skipped"] == {"over_budget": 1} and summary["pacore_accuracy"] == 0.0
    assert summary["sere_scored"] == 3


def test_config_mistakes_name_the_key(tmp_path):
    with pytest.raises(UsageError, match=r"unknown config key chat.bakend: did you mean chat.backend\?"):
        build(InferenceConfig, {"chat": {"bakend": "hf"}, "data": {"paths": "x.jsonl"}})
    with pytest.raises(UsageError, match=r"pacore.rounds must be a non-empty list"):
        build(InferenceConfig, {"data": {"paths": "x.jsonl"}, "pacore": {"rounds": []}})
    with pytest.raises(UsageError, match="chat.endpoint.base_url is not set"):
        build_chat_model(build(InferenceConfig, {"chat": {"backend": "openai"}, "data": {"paths": "x"}}).chat)
    with pytest.raises(UsageError, match=r"chat.backend must be one of \('openai', 'hf', 'vllm'\)"):
        build_chat_model(build(InferenceConfig, {"chat": {"backend": "sglang"}, "data": {"paths": "x"}}).chat)


def test_the_command_on_the_tiny_model(exported_tiny_model, tmp_path):
    data = write_problems(tmp_path, PROBLEMS)
    out = tmp_path / "run"
    command = [
        sys.executable, str(REPO / "launch" / "pacore.py"), f"model={exported_tiny_model}", f"data={data}",
        f"chat.processor={REPO / 'configs' / 'processor' / 'tiny.yaml'}", "chat.max_new_tokens=12",
        "pacore.rounds=[3]", "pacore.keep_unfinished=true", "pacore.max_message_tokens=8", f"out={out}",
        "batch_problems=2", "reward.num_workers=1",
    ]  # fmt: skip
    environment = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, env=environment)
    assert done.returncode == 0, done.stderr[-4000:]
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert json.loads((out / "summary.json").read_text()) == summary
    results = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert [r["key"].rsplit(":", 1)[1] for r in results] == ["p0", "p1", "p2"]
    assert summary["problems"] == 3 and summary["calls"] == 3 * (3 + 1)
    # The random model gets nothing right, yet both accuracies are measured: every response is scored.
    assert summary["sere_accuracy"] == 0.0 and summary["sere_scored"] == 9
    assert summary["pacore_accuracy"] == 0.0 and summary["pacore_scored"] == 3
    for result in results:
        assert [len(replies) for replies in result["rounds"]] == [3, 1]
        assert all(r["status"] == "ok" for replies in result["rounds"] for r in replies)
        assert result["final"]["reasoning"] == split_reasoning(result["final"]["text"])[0]  # None without </think>
