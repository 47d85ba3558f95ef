"""Benchmark evaluation (rl/evaluation/, launch/evaluate.py): the prompt template, the accuracy and its
interval, SeRe and PaCoRe against an OpenAI-compatible endpoint on loopback whose answers are known, an
interrupted run resumed, and the command's path on the tiny model with the transformers engine."""

import json
import math
import re
import threading
from collections import Counter
from dataclasses import dataclass, field

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from launch.evaluate import SHORTCUTS, score_checkpoint
from rl.chat_models import build_chat_model
from rl.evaluation.accuracy import Z95, accuracy
from rl.evaluation.config import EvaluateConfig
from rl.evaluation.prompts import apply_template
from rl.evaluation.run import evaluate
from rl.rewards import RewardRequest, resolve
from step3vl_train.cli import CONFIGS, expand_shortcuts
from step3vl_train.model.checkpoint import save_config
from step3vl_train.processing.model_processor import save_processor, saved_settings
from step3vl_train.processing.processor import load_processor
from step3vl_train.processing.tokenizer import load_tokenizer
from step3vl_train.usage import UsageError, build
from tests.conftest import REPO, load_model_config
from tests.rl.chat_endpoint import chat_endpoint
from tests.rl.test_pacore_inference import is_synthesis, png, user_text

IMAGE = {"type": "image"}


def text(value: str) -> dict:
    return {"type": "text", "text": value}


def user(*parts) -> dict:
    return {"role": "user", "content": list(parts)}


def test_the_template_puts_the_question_and_the_images_in_their_places():
    mathvision = OmegaConf.load(CONFIGS / "bench" / "mathvision.yaml").template
    instruction = 'Please solve the problem and put your answer in one "\\boxed{}". If it is a multiple choice ' \
                  'question, only one letter is allowed in the "\\boxed{}". '  # fmt: skip
    earlier = [{"role": "system", "content": "Be brief."}, user(text("Hi")), {"role": "assistant", "content": "Hi."}]
    stored = [*earlier, user(IMAGE, text("Which is larger?"), text("(A) 1 (B) 2"))]
    # The report's text as written, the image where `<image>` stands, the question's parts joined by newlines;
    # earlier turns as they were.
    assert apply_template(stored, mathvision) == [
        *earlier, user(text(instruction), IMAGE, text(" Which is larger?\n(A) 1 (B) 2"))
    ]  # fmt: skip
    assert stored[-1] == user(IMAGE, text("Which is larger?"), text("(A) 1 (B) 2"))  # not changed in place
    screenspot = OmegaConf.load(CONFIGS / "bench" / "screenspot.yaml").template
    [turn] = apply_template([user(text("open the <image> menu"), IMAGE)], screenspot)
    # a question quoting "<image>" stays text
    assert turn["content"] == [IMAGE, text(" Based on the instruction 'open the <image> menu', locate the target "
                                           "element and output its coordinate point in JSON format.")]  # fmt: skip
    two = [user(IMAGE, IMAGE, text("Same?"))]
    assert apply_template(two, "<image>{question}")[0]["content"] == [IMAGE, IMAGE, text("Same?")]
    assert apply_template(two, "A: <image> B: <image> {question}")[0]["content"] == [
        text("A: "), IMAGE, text(" B: "), IMAGE, text(" Same?")
    ]  # fmt: skip
    assert apply_template(two, "Q: {question}")[0]["content"] == [IMAGE, IMAGE, text("Q: Same?")]  # before the text
    assert apply_template([{"role": "user", "content": "2+2?"}], "<image>{question} Box it.")[0]["content"] == [
        text("2+2? Box it.")
    ]  # fmt: skip
    with pytest.raises(ValueError, match="the template has 3 <image>s but the turn 2 image"):
        apply_template(two, "<image><image><image>{question}")


def test_accuracy_is_the_mean_of_problem_means_with_a_clustered_interval():
    # Problem means 1, 0, 0.5 (a scorer failure left out), 0.75: mean 0.5625.
    result = accuracy([[1.0, 1.0], [0.0, 0.0], [1.0, 0.0], [1.0, 1.0, 1.0, 0.0], []])
    means = [1.0, 0.0, 0.5, 0.75]
    deviation = math.sqrt(sum((m - 0.5625) ** 2 for m in means) / 3)
    assert result.mean == 0.5625 and result.problems == 4
    assert result.ci95 == pytest.approx([0.5625 - Z95 * deviation / 2, 0.5625 + Z95 * deviation / 2])
    # Every problem always or never solved: the interval is that of 4 answers, not of 8 independent ones.
    assert accuracy([[1, 1], [1, 1], [0, 0], [1, 1]]).ci95 == accuracy([[1], [1], [0], [1]]).ci95
    assert accuracy([[1.0], [1.0], [0.0]]).ci95[1] == 1.0  # clipped
    assert accuracy([[0.0], [0.0]]).ci95 == [0.0, 0.0]
    assert accuracy([[1.0, 0.0]]).ci95 is None and accuracy([[], []]).mean is None


def test_point_in_box_is_a_hit_inside_the_target():
    def score(response: str) -> float:
        request = RewardRequest(f"x</think>{response}", "", boxes=[[100, 50, 200, 100]], image_size=(400, 200))
        return resolve("point_in_box").fn(request, coords="norm1000")

    assert score('{"point": [375, 375]}') == 1.0  # (150, 75) px
    assert score("[501, 375]") == 0.0 and score("[375, 375] or [900, 900]") == 1.0  # the first point counts


# Problems with known answers, and how the endpoint answers each (SeRe rollouts / syntheses).
PROBLEMS = {
    "Q0: colour?": ("A", "red"),  # always right
    "Q1: shape?": ("B", None),  # rollouts wrong, syntheses right
    "Q2: size?": ("C", "blue"),  # right in one rollout of two
    "Q3: count?": ("D", None),  # answers with no option letter
    "Q4: where?": ("A", None),  # every call fails
}


def write_problems(tmp_path, questions=PROBLEMS) -> str:
    lines = []
    for index, (question, (answer, colour)) in enumerate(questions.items()):
        record = {"key": f"p{index}", "answer": answer, "messages": [user(text(question))]}
        if colour:
            (tmp_path / f"p{index}.png").write_bytes(png(colour))
            record["messages"] = [user(IMAGE, text(question))]
            record["images"] = [f"p{index}.png"]
        lines.append(json.dumps(record))
    (tmp_path / "bench.jsonl").write_text("\n".join(lines) + "\n")
    return str(tmp_path / "bench.jsonl")


def problem_of(body: dict) -> str:
    """The question a call is about, wherever the template or a synthesis prompt put it."""
    return re.search(r"Q\d: \w+\?", user_text(body["messages"][-1])).group()


@dataclass
class Known:
    """The endpoint: a reply by the problem and the call's count for it; every call's body kept."""

    bodies: list[dict] = field(default_factory=list)
    seen: Counter = field(default_factory=Counter)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def answer(self, body: dict) -> tuple:
        question = problem_of(body)
        with self.lock:
            self.bodies.append(body)
            self.seen[question, is_synthesis(body)] += 1
            count = self.seen[question, is_synthesis(body)]
        right = PROBLEMS[question][0]
        if question.startswith("Q4"):
            return 500, None, None
        if question.startswith("Q3"):
            return 200, "No idea", "Hmm."
        if is_synthesis(body):
            return 200, f"\\boxed{{{right if question[:2] in ('Q0', 'Q1') else 'D'}}}", "The references say."
        correct = question.startswith("Q0") or (question.startswith("Q2") and count % 2 == 1)
        return 200, f"\\boxed{{{right if correct else 'D'}}}", "Let me look."

    def calls(self) -> Counter:
        """Calls by (problem, synthesis or not)."""
        return Counter((problem_of(body)[:2], is_synthesis(body)) for body in self.bodies)


class Interrupting:
    """The chat model, interrupted (as by Ctrl-C) at its `stop_at`-th call, its limited views counted alike."""

    def __init__(self, model, stop_at: int, calls: list | None = None):
        self.model, self.stop_at, self.calls = model, stop_at, [] if calls is None else calls

    def complete(self, requests, n=1, seed=0):
        self.calls.append(len(requests))
        if len(self.calls) == self.stop_at:
            raise KeyboardInterrupt
        return self.model.complete(requests, n, seed)

    def limited(self, max_new_tokens):
        return Interrupting(self.model.limited(max_new_tokens), self.stop_at, self.calls)

    def close(self):
        self.model.close()


def run(tmp_path, url: str, data: str, stop_at: int = 0, **values) -> dict:
    endpoint = {"base_url": url, "model": "policy", "timeout_s": 5.0, "max_retries": 0}
    values = {
        "chat": {"backend": "openai", "endpoint": endpoint, "tokenizer": "tiny", "max_new_tokens": 300},
        "bench": {"name": "known", "data": {"paths": data}, "template": "Answer with a letter. <image>{question}",
                  "reward": "choice", "samples": 2, "max_new_tokens": {"sere": 100, "pacore": 500}},
        "out": str(tmp_path / "out"),
        "pacore": {"rounds": [2]},
        "reward": {"num_workers": 1},
        "batch_problems": 2,
        **values,
    }  # fmt: skip
    config = build(EvaluateConfig, values)
    model = Interrupting(build_chat_model(config.chat), stop_at)
    try:
        return evaluate(config, model, load_tokenizer("tiny"))
    finally:
        model.close()


def results(tmp_path) -> list[dict]:
    return [json.loads(line) for line in (tmp_path / "out" / "known" / "results.jsonl").read_text().splitlines()]


def test_known_answers_give_the_exact_accuracy_and_interval_side_by_side(tmp_path):
    endpoint = Known()
    with chat_endpoint(endpoint.answer) as url:
        summary = run(tmp_path, url, write_problems(tmp_path))
    assert json.loads((tmp_path / "out" / "known" / "summary.json").read_text()) == summary
    # SeRe: problem means 1, 0, 0.5, 0, 0 -> 0.3, the standard deviation of those sqrt(0.2), over sqrt(5): 0.2.
    sere, pacore = summary["modes"]["sere"], summary["modes"]["pacore"]
    assert sere["accuracy"] == pytest.approx(0.3)
    assert sere["ci95"] == pytest.approx([0.0, 0.3 + Z95 * 0.2])
    assert sere["statuses"] == {"ok": 6, "no_answer": 2, "error": 2}  # Q4's failed calls score 0
    assert (sere["problems"], sere["samples"], sere["scored"], sere["calls"]) == (5, 10, 10, 10)
    # PaCoRe: two runs a problem, each 2 rollouts and a synthesis; Q0 and Q1's syntheses are right.
    assert pacore["accuracy"] == pytest.approx(0.4)
    assert pacore["ci95"] == pytest.approx([0.0, 0.4 + Z95 * math.sqrt(0.3 / 5)])
    assert (pacore["problems"], pacore["samples"], pacore["calls"]) == (5, 10, 5 * 2 * 3)
    # SeRe's 2 calls and PaCoRe's 2 x 2 rollouts a problem, 2 syntheses; Q4's are the bare problem (no references).
    assert endpoint.calls() == {**{(f"Q{i}", False): 2 + 4 for i in range(5)}, **{(f"Q{i}", True): 2 for i in range(4)},
                                ("Q4", False): 2 + 2 * 3}  # fmt: skip

    # Each mode's reply length: the benchmark's, capped by chat.max_new_tokens.
    syntheses = {b["max_tokens"] for b in endpoint.bodies if is_synthesis(b)}
    sere_calls = [b for b in endpoint.bodies if not is_synthesis(b) and b["max_tokens"] == 100]
    assert syntheses == {300} and len(sere_calls) == 10
    # The template: its text, then the image where <image> stands, then the question.
    body = next(b for b in sere_calls if problem_of(b) == "Q0: colour?")
    [message] = body["messages"]
    assert [p["type"] for p in message["content"]] == ["text", "image_url", "text"]
    assert user_text(message) == "Answer with a letter. Q0: colour?"

    lines = results(tmp_path)
    assert Counter((line["key"].rsplit(":", 1)[1], line["mode"]) for line in lines) == {
        (f"p{i}", mode): 1 for i in range(5) for mode in ("sere", "pacore")
    }  # fmt: skip
    q2 = next(line for line in lines if line["key"].endswith("p2") and line["mode"] == "sere")
    assert sorted(r["score"] for r in q2["responses"]) == [0.0, 1.0] and q2["answer"] == "C"
    assert all(r["text"].startswith("Let me look.</think>\\boxed{") for r in q2["responses"])
    q1 = next(line for line in lines if line["key"].endswith("p1") and line["mode"] == "pacore")
    assert [r["score"] for r in q1["responses"]] == [1.0, 1.0] and len(q1["runs"]) == 2
    assert all(len(run["rounds"]) == 2 and run["sere_rewards"][0]["score"] == 0.0 for run in q1["runs"])


def test_an_interrupted_evaluation_resumes_with_only_the_problems_left(tmp_path):
    data = write_problems(tmp_path)
    with chat_endpoint(Known().answer) as url:
        # Batches of 2: (sere, pacore's 2 rounds) for p0-p1, then sere for p2-p3; pacore's next call is cut.
        with pytest.raises(KeyboardInterrupt):
            run(tmp_path, url, data, stop_at=5)
    path = tmp_path / "out" / "known" / "results.jsonl"
    assert [(line["key"][-2:], line["mode"]) for line in results(tmp_path)] == [
        ("p0", "sere"), ("p1", "sere"), ("p0", "pacore"), ("p1", "pacore"), ("p2", "sere"), ("p3", "sere")
    ]  # fmt: skip
    path.write_bytes(path.read_bytes()[:-40])  # p3's line torn, as a kill while writing leaves it

    endpoint = Known()
    with chat_endpoint(endpoint.answer) as url:
        summary = run(tmp_path, url, data)
    # Asked again: p3's SeRe (its line was torn), pacore for p2-p3, both modes for p4; nothing else.
    assert endpoint.calls() == {("Q2", False): 4, ("Q2", True): 2, ("Q3", False): 2 + 4, ("Q3", True): 2,
                                ("Q4", False): 2 + 2 * 3}  # fmt: skip
    assert summary["modes"]["sere"]["problems_this_run"] == 2 and summary["modes"]["pacore"]["problems_this_run"] == 3
    # The summary covers every problem, whichever run scored it: the same figures as one uninterrupted run.
    assert summary["modes"]["sere"]["accuracy"] == pytest.approx(0.3) and summary["modes"]["sere"]["samples"] == 10
    assert summary["modes"]["pacore"]["accuracy"] == pytest.approx(0.4) and summary["modes"]["pacore"]["problems"] == 5
    assert Counter((line["key"][-2:], line["mode"]) for line in results(tmp_path)) == {
        (f"p{i}", mode): 1 for i in range(5) for mode in ("sere", "pacore")
    }  # fmt: skip

    # Other settings into the same folder are refused, not mixed into its summary.
    with pytest.raises(UsageError, match=r"holds pacore results of an evaluation with other settings \(pacore differ"):
        run(tmp_path, "http://127.0.0.1:9/v1", data, pacore={"rounds": [3]})


def command_config(words: list[str]):
    with initialize_config_dir(str(CONFIGS), version_base="1.3"):
        return compose("evaluate", expand_shortcuts(words, SHORTCUTS))


def test_the_command_on_the_tiny_model(exported_tiny_model, tmp_path, capsys):
    data = write_problems(tmp_path, dict(list(PROBLEMS.items())[:3]))
    out = tmp_path / "eval"
    cfg = command_config([
        f"model={exported_tiny_model}", "bench=mathvision", f"data={data}", "modes=[sere,pacore]",
        "chat.tokenizer=tiny", f"chat.processor={REPO / 'configs' / 'processor' / 'tiny.yaml'}",
        "chat.max_new_tokens=6", "pacore.rounds=[2]", "pacore.keep_unfinished=true", "pacore.max_message_tokens=8",
        "bench.samples=2", f"out={out}", "reward.num_workers=1",
    ])  # fmt: skip
    score_checkpoint(cfg)
    printed = capsys.readouterr().out.strip().splitlines()
    summary = json.loads(printed[-1])
    assert json.loads((out / "mathvision" / "summary.json").read_text()) == summary
    assert printed[-4].split()[:2] == ["mathvision", "accuracy"]
    assert [row.split()[:3] for row in printed[-3:-1]] == [["sere", "0.00", "[0.00,"], ["pacore", "0.00", "[0.00,"]]
    # The random model gets nothing right, yet every response was asked and scored, through the template.
    sere, pacore = summary["modes"]["sere"], summary["modes"]["pacore"]
    assert (sere["accuracy"], sere["ci95"], sere["samples"], sere["scored"]) == (0.0, [0.0, 0.0], 6, 6)
    assert sere["calls"] == 3 * 2
    assert (pacore["accuracy"], pacore["samples"], pacore["scored"], pacore["calls"]) == (0.0, 6, 6, 3 * 2 * 3)
    lines = [json.loads(line) for line in (out / "mathvision" / "results.jsonl").read_text().splitlines()]
    responses = [r for line in lines for r in line["responses"]]
    assert len(lines) == 6 and {r["status"] for r in responses} <= {"truncated", "no_reasoning"}  # no </think>
    assert {line["reward"] for line in lines} == {"math"}  # the benchmark's


def test_the_model_plans_images_with_its_exports_processor_unless_one_is_given(tmp_path):
    """Before: an export of the tiny model planned its images at the released processor's 728 pixels (and
    scored 0.00 where its own settings score 0.20), unless chat.processor named the tiny ones."""
    save_config(load_model_config("tiny"), tmp_path)
    save_processor(load_processor("tiny", str(REPO / "configs" / "processor" / "tiny.yaml")), tmp_path)

    def chat(*words):
        cfg = command_config([f"model={tmp_path}", "bench=mathvision", "data=x.jsonl", *words])
        return build(EvaluateConfig, OmegaConf.to_container(cfg, resolve=True)).chat

    assert chat().processor_settings("chat") == saved_settings(tmp_path)
    assert chat("chat.backend=vllm").processor_settings("chat")["crop_rule"] == "vllm"
    with pytest.raises(UsageError, match=r"chat\.processor: the processor has image_size=728 .* drop chat\.processor"):
        chat(f"chat.processor={REPO / 'configs' / 'processor' / 'step3vl.yaml'}").processor_settings("chat")
