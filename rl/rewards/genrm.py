"""GenRM: a generative judge compares the policy's response with a stronger teacher's reference response to
the same prompt, reasons, then scores both; the reward is how the policy's answer fares against the reference.

What the judge is shown (`templates/genrm_pairwise.txt`, replaceable by `template`): the question's images as
image parts, then one text: the instructions, the question, response A, response B. Only the final answer of
each response is shown (the text after its last `</think>`), cut around a marked elision to
`max_answer_chars`: reasoning is never judged. The question and the two responses sit in blocks whose tags
carry a nonce (`<response-A-7f3a...>` ... `</response-A-7f3a...>`) that occurs in none of them, so a response
cannot close its block and write outside it. A template is `str.format` text with the placeholders
{question}, {response_a}, {response_b}, {max_score} and optionally {nonce}; a literal brace is doubled.

Position bias: judges favour one position. Each item is judged twice, the policy's answer physically placed
as A, then as B, the reference in the other place, and the two orders' preferences are averaged. Relabelling
alone (calling the first block "B") would leave each text where it was and keep the bias; moving the texts
is what cancels it: a judge that always prefers position A gives exactly 0.5. The orders' disagreement on
which answer is better is logged as `position_disagreement`.

Shared prefixes: with the question first, a prompt's rollouts share the instructions and the question (the
policy-first order) or those and the reference (the reference-first order), which a prefix-caching engine
computes once. That is why the nonce is drawn per question and reference in each call, not per request: a
nonce in the instructions that changed with every request would end the shared prefix there. It is drawn
after the responses exist and checked absent from all of them, so it is as unguessable as one per request.

Scores: per order, preference = 0.5 + (s_policy - s_reference) / (2 * max_score), in [0, 1], 0.5 as good
as the reference. A reply the parser refuses (`parser`, `pkg.module:function(reply) -> (score_a, score_b)`,
raising ValueError), one over `max_reply_chars` or scores outside [0, max_score] make the item "unparsed";
a judge's timeout or error is the item's status. Such items are masked, never scored.
"""

from __future__ import annotations

import re
import secrets
import string
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from rl.chat_models import ChatModel, ChatReply, ChatRequest
from rl.rewards.answer import split_reasoning
from rl.rewards.verifier_protocol import elide
from step3vl_train.usage import import_callable

PLACEHOLDERS = ("question", "response_a", "response_b", "max_score")
OPTIONAL_PLACEHOLDERS = ("nonce",)
PACKAGED_TEMPLATE = resources.files("rl.rewards") / "templates" / "genrm_pairwise.txt"
SCORES_LINE = re.compile(r"SCORES: A=(\d+(?:\.\d+)?) B=(\d+(?:\.\d+)?)")


@dataclass
class JudgeItem:
    messages: list[dict]  # the prompt's chat messages, image parts {"type": "image"} in order
    images: list[bytes]  # encoded images, in order of the image parts
    response: str  # the policy's full response (reasoning included; only the final answer is judged)
    reference: str  # the teacher's response


@dataclass
class Judgement:
    preference: float | None  # [0, 1]; None unless status == "ok"
    status: str  # "ok" | "unparsed" | "timeout" | "error"
    # genrm (the preference), genrm/policy_first, genrm/reference_first, position_disagreement; empty unless "ok"
    components: dict[str, float] = field(default_factory=dict)
    detail: str = ""


@dataclass
class GenRMConfig:
    template: str | None = None  # a file; None: the packaged template
    parser: str = "rl.rewards.genrm:parse_scores"  # pkg.module:function(reply: str) -> (score_a, score_b)
    max_score: float = 10.0
    max_answer_chars: int = 16000  # of each final answer shown; longer ones keep their head and tail
    max_reply_chars: int = 16000  # of the judge's reply, stripped; a longer one is "unparsed"


def parse_scores(reply: str) -> tuple[float, float]:
    """(score of A, score of B) from the reply's last non-empty line, which must be exactly
    `SCORES: A=<number> B=<number>` (digits, optional decimals). Raises ValueError otherwise."""
    lines = [line.strip() for line in reply.splitlines() if line.strip()]
    if not lines:
        raise ValueError("an empty reply")
    match = SCORES_LINE.fullmatch(lines[-1])
    if match is None:
        raise ValueError(f"the last line is not 'SCORES: A=<number> B=<number>': {lines[-1][:200]!r}")
    return float(match[1]), float(match[2])


def load_template(path: str | None) -> str:
    """The template's text, checked: every placeholder present, no other field, braces balanced."""
    name = path or "the packaged template"
    try:
        text = (Path(path) if path else PACKAGED_TEMPLATE).read_text()
    except OSError as error:
        raise ValueError(f"genrm.template {name} cannot be read: {error}") from error
    try:
        fields = {parsed[1] for parsed in string.Formatter().parse(text) if parsed[1] is not None}
    except ValueError as error:
        raise ValueError(f"genrm.template {name}: {error} (write a literal brace as '{{{{' or '}}}}')") from error
    missing = [placeholder for placeholder in PLACEHOLDERS if placeholder not in fields]
    if missing:
        raise ValueError(f"genrm.template {name} lacks the placeholders {missing}")
    unknown = sorted(fields - set(PLACEHOLDERS) - set(OPTIONAL_PLACEHOLDERS))
    if unknown:
        raise ValueError(
            f"genrm.template {name} has unknown fields {unknown}: the placeholders are "
            f"{list(PLACEHOLDERS + OPTIONAL_PLACEHOLDERS)}; write a literal brace as '{{{{' or '}}}}'"
        )
    return text


def resolve_parser(path: str) -> Callable[[str], tuple[float, float]]:
    """The parser function named `pkg.module:function`."""
    return import_callable(path, "genrm.parser")


def conversation_text(messages: list[dict]) -> tuple[str, int]:
    """(the prompt as the judge reads it, its number of image parts): its text, each image part written
    `[image k]` (k from 1, the order the images are attached in); with several turns, each under its role."""
    turns, images = [], 0
    for message in messages:
        content = message["content"]
        if not isinstance(content, str):
            pieces = []
            for part in content:
                if part["type"] == "image":
                    images += 1
                    pieces.append(f"[image {images}]")
                elif part["type"] == "text":
                    pieces.append(part["text"])
            content = "\n".join(pieces)
        turns.append((message["role"], content))
    if len(turns) == 1:
        return turns[0][1], images
    return "\n\n".join(f"{role}: {content}" for role, content in turns), images


def fresh_nonce(contents: list[str]) -> str:
    """16 random hex digits that occur in none of `contents`."""
    nonce = secrets.token_hex(8)
    while any(nonce in content for content in contents):
        nonce = secrets.token_hex(8)
    return nonce


def block(name: str, nonce: str, content: str) -> str:
    return f"<{name}-{nonce}>\n{content}\n</{name}-{nonce}>"


def sign(value: float) -> int:
    return (value > 0) - (value < 0)


class GenRM:
    def __init__(self, config: GenRMConfig, judge: ChatModel):
        """`judge`: any chat model (rl/chat_models.py); only its replies' `text` is read."""
        if config.max_score <= 0:
            raise ValueError(f"genrm.max_score must be positive, not {config.max_score}")
        self.config = config
        self.template = load_template(config.template)
        self.parser = resolve_parser(config.parser)
        self.backend = judge

    def judge(self, items: list[JudgeItem]) -> list[Judgement]:
        """Each item judged in both orders: 2 requests an item, sent to the judge as one batch."""
        shown = []  # (question, reference's final answer, policy's final answer)
        for index, item in enumerate(items):
            question, image_parts = conversation_text(item.messages)
            if image_parts != len(item.images):
                raise ValueError(f"genrm item {index}: {image_parts} image parts, {len(item.images)} images")
            shown.append((question, self.final(item.reference), self.final(item.response)))
        groups: dict[tuple[str, str], list[str]] = {}
        for question, reference, response in shown:
            groups.setdefault((question, reference), [question, reference]).append(response)
        nonces = {key: fresh_nonce(contents) for key, contents in groups.items()}
        requests = []
        for item, (question, reference, response) in zip(items, shown, strict=True):
            nonce = nonces[question, reference]
            for first, second in ((response, reference), (reference, response)):
                text = self.render(question, first, second, nonce)
                content = [{"type": "image"} for _ in item.images] + [{"type": "text", "text": text}]
                requests.append(ChatRequest([{"role": "user", "content": content}], list(item.images)))
        answered = self.backend.complete(requests)
        if [len(group) for group in answered] != [1] * len(requests):
            raise RuntimeError(
                f"the judge gave {len(answered)} groups of replies to {len(requests)} requests, not 1 each"
            )
        replies = [group[0] for group in answered]
        return [self.judgement(replies[2 * i], replies[2 * i + 1]) for i in range(len(items))]

    def final(self, response: str) -> str:
        return elide(split_reasoning(response)[1].strip(), self.config.max_answer_chars)

    def render(self, question: str, response_a: str, response_b: str, nonce: str) -> str:
        return self.template.format(
            question=block("question", nonce, question),
            response_a=block("response-A", nonce, response_a),
            response_b=block("response-B", nonce, response_b),
            max_score=f"{self.config.max_score:g}",
            nonce=nonce,
        )

    def scores(self, reply: ChatReply) -> tuple[float, float]:
        """(score of A, score of B) of a reply that came back. Raises ValueError for one the parser refuses,
        one over `max_reply_chars`, or a score outside [0, max_score]."""
        text = (reply.text or "").strip()
        if len(text) > self.config.max_reply_chars:
            raise ValueError(f"a reply of {len(text)} characters, over the {self.config.max_reply_chars} allowed")
        score_a, score_b = (float(score) for score in self.parser(text))
        for name, score in (("A", score_a), ("B", score_b)):
            if not 0 <= score <= self.config.max_score:
                raise ValueError(f"score {name}={score:g} outside [0, {self.config.max_score:g}]")
        return score_a, score_b

    def judgement(self, policy_first: ChatReply, reference_first: ChatReply) -> Judgement:
        orders = {"policy first": policy_first, "reference first": reference_first}
        failed = {name: reply for name, reply in orders.items() if reply.status != "ok"}
        if failed:
            status = "timeout" if any(reply.status == "timeout" for reply in failed.values()) else "error"
            detail = "; ".join(f"{name}: {reply.status} {reply.detail}".strip() for name, reply in failed.items())
            return Judgement(None, status, detail=detail)
        scores, errors = {}, []
        for name, reply in orders.items():
            try:
                scores[name] = self.scores(reply)
            except ValueError as error:
                errors.append(f"{name}: {error}")
        if errors:
            return Judgement(None, "unparsed", detail="; ".join(errors))
        (policy_a, reference_b), (reference_a, policy_b) = scores["policy first"], scores["reference first"]
        # s_policy - s_reference in each order; the mean preference from their sum, so that equal and
        # opposite differences (a pure position preference) give exactly 0.5.
        first, second = policy_a - reference_b, policy_b - reference_a
        scale = 2 * self.config.max_score
        preference = 0.5 + (first + second) / (2 * scale)
        components = {
            "genrm": preference,
            "genrm/policy_first": 0.5 + first / scale,
            "genrm/reference_first": 0.5 + second / scale,
            "position_disagreement": float(sign(first) != sign(second)),
        }
        detail = "; ".join(f"{name}: A={a:g} B={b:g}" for name, (a, b) in scores.items())
        return Judgement(preference, "ok", components, detail)
