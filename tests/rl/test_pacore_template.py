"""PaCoRe's synthesis prompt (byte-exact against spec 6.3), compaction, reference order, and the draw of a
training episode's messages from a pool."""

import io
import random
from collections import Counter

import pytest
from PIL import Image

from rl.config import PromptsConfig
from rl.pacore.config import PaCoReConfig
from rl.pacore.messages import ELISION, Compactor, Rollout, draw_messages, official_order, seeded_order
from rl.pacore.template import conclusion, original_prompt, render, synthesis_messages
from rl.prompts import PromptLoader
from step3vl_train.data.shards import ShardSetWriter
from step3vl_train.data.sources import record_key

# Spec 6.3: the official template rendered with jinja2's defaults, for two references.
GOLDEN = (
    "You are given a problem and a list of reference responses. Your job is to analyze these references and "
    "provide your own response.\n\nOriginal Problem:\nWhat is 2+2?\n\nReference Responses:\n\nReference 1:\n"
    "Answer A\n\nReference 2:\nAnswer B\n\n\nNow, based on the original problem and reference responses above, "
    "please provide your own comprehensive solution."
)


def test_render_is_byte_exact_and_bypassed_without_references():
    assert render("What is 2+2?", ["Answer A", "Answer B"]) == GOLDEN
    assert render("What is 2+2?", []) == "What is 2+2?"
    # no HTML escaping, and a message's own newlines and braces pass through untouched
    assert "Reference 1:\na < b & {c}\n\nline 2\n" in render("p", ["a < b & {c}\n\nline 2"])


def test_conclusion_is_the_text_after_the_last_think_end():
    assert conclusion("step 1</think>not this</think> \\boxed{4}") == " \\boxed{4}"
    assert conclusion("no reasoning marker") == "no reasoning marker"


def test_synthesis_keeps_images_and_earlier_turns():
    messages = [
        {"role": "user", "content": "first question"},
        {"role": "assistant", "content": "first answer"},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Which colour?"},
                                     {"type": "image"}, {"type": "text", "text": "Answer with a letter."}]},
    ]  # fmt: skip
    assert original_prompt(messages) == "Which colour?\nAnswer with a letter."
    out = synthesis_messages(messages, ["A", "B"])
    assert out[:2] == messages[:2]
    assert out[2]["content"] == [
        {"type": "image"},
        {"type": "text", "text": render("Which colour?\nAnswer with a letter.", ["A", "B"])},
        {"type": "image"},
    ]
    assert messages[2]["content"][1]["text"] == "Which colour?"  # the original is not touched
    assert synthesis_messages(messages, []) == messages


class CharTokenizer:
    """One token a character: budgets become character counts."""

    def encode(self, text, add_special_tokens=False):
        return [ord(c) for c in text]

    def decode(self, ids):
        return "".join(map(chr, ids))


def compactor(**overrides) -> Compactor:
    return Compactor(PaCoReConfig(**overrides), CharTokenizer())


def test_failed_empty_and_unfinished_rollouts_are_dropped_and_counted():
    rollouts = [
        Rollout("r</think>alpha"),
        Rollout(None),  # a failed call
        Rollout("r</think>   "),  # nothing after the reasoning
        Rollout(""),  # an empty reply
        Rollout("reasoning cut at the limit", "length"),
        Rollout("r</think>cut too", "length"),
        Rollout("r</think>beta"),
    ]
    out = compactor().from_rollouts("p", rollouts, list(range(7)))
    assert out.texts == ["alpha", "beta"]
    assert out.dropped == Counter(failed=1, empty=2, unfinished=2) and out.kept == [0, 6]
    kept = compactor(keep_unfinished=True).from_rollouts("p", rollouts, list(range(7)))
    # the official behaviour: an unfinished response passes its whole text on
    assert kept.texts == ["alpha", "reasoning cut at the limit", "cut too", "beta"]


def test_messages_are_capped_and_the_budget_drops_or_skips():
    out = compactor(max_message_tokens=10).compact("p", [("0123456789abcdef", True), ("short", True)])
    assert out.texts == ["01234" + ELISION + "bcdef", "short"] and out.capped == 1
    one = len(render("p", ["x" * 10]))
    dropped = compactor(max_synthesis_tokens=one).compact("p", [("x" * 10, True), ("y" * 10, True)])
    assert dropped.texts == ["x" * 10] and dropped.dropped["over_budget"] == 1
    skipped = compactor(max_synthesis_tokens=one, over_budget="skip").compact("p", [("x" * 10, True)] * 2)
    assert skipped.skipped and skipped.texts == [] and skipped.dropped["over_budget"] == 2


def test_official_order_is_sort_by_length_then_random_42():
    contents = ["ccc", "", "a", "bbbb", "dd", ""]
    expected = sorted(contents, key=len)  # the official code, on the response objects
    random.Random(42).shuffle(expected)
    assert [contents[i] for i in official_order(contents)] == expected
    assert official_order(["x", "yy"]) == official_order(["u", "vv"])  # every problem, the same permutation


def test_seeded_order_depends_on_the_problem_and_repeats():
    assert seeded_order(16, 0, "a", 1) == seeded_order(16, 0, "a", 1)
    assert seeded_order(16, 0, "a", 1) != seeded_order(16, 0, "b", 1)
    assert sorted(seeded_order(16, 0, "a", 1)) == list(range(16))


def pool_entry(text, reward=1.0, finished=True):
    return {"text": text, "finished": finished, "reward": reward, "status": "ok", "model": "m"}


def test_draws_are_seeded_by_seed_step_and_key_within_the_size_bounds():
    pool = [pool_entry(f"m{i}", reward=float(i % 2)) for i in range(24)] + [pool_entry("cut", finished=False)]
    c = compactor(messages=[16, 24])
    draw = draw_messages(c, "p", pool, seed=0, step=3, key="k")
    assert draw == draw_messages(c, "p", pool, seed=0, step=3, key="k")
    assert 16 <= len(draw.indices) <= 24 and 24 not in draw.indices  # the unfinished entry is never drawn
    assert draw.references.texts == [f"m{i}" for i in draw.indices]
    assert draw.message_reward == pytest.approx(sum(i % 2 for i in draw.indices) / len(draw.indices))
    others = {tuple(draw_messages(c, "p", pool, seed=0, step=s, key="k").indices) for s in range(4, 10)}
    assert len(others) == 6 and tuple(draw.indices) not in others
    sizes = {len(draw_messages(c, "p", pool, 0, s, "k").indices) for s in range(200)}
    assert sizes == set(range(16, 25))
    assert draw_messages(compactor(messages=[0, 0]), "p", pool, 0, 1, "k").references.texts == []


def png() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (40, 30), "red").save(buffer, format="PNG")
    return buffer.getvalue()


def test_the_loader_turns_pooled_samples_into_synthesis_prompts(tiny_processor, tmp_path):
    writer = ShardSetWriter(str(tmp_path))
    question = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Which colour?"}]}]
    for index in range(3):
        pool = [pool_entry(f"\\boxed{{{c}}}", reward=float(c == "A")) for c in "AABBA"] if index < 2 else []
        record = {"messages": question, "answer": "A", "reward": "choice", "pool": pool}
        writer.write(f"p{index}", record, [png()], ["png"])
    writer.close()
    pacore = PaCoReConfig(messages=[2, 4])
    config = PromptsConfig(train=f"{tmp_path}/*.tar")
    loader = PromptLoader(config, tiny_processor, max_epochs=1, pacore=pacore, keep_pools=True)
    prompts = loader.next_batch(3, step=7)
    assert len(prompts) == 2 and loader.skips == Counter(no_messages=1)  # the third has no pool
    for prompt in prompts:
        assert prompt.key.endswith(f":{record_key(prompt.key)}")  # seeded by the sample's own key
        draw = draw_messages(Compactor(pacore, tiny_processor.tokenizer), "Which colour?", prompt.pool, 0, 7,
                             record_key(prompt.key))  # fmt: skip
        assert prompt.synthesis.indices == draw.indices
        assert prompt.synthesis.message_reward == draw.message_reward
        assert prompt.messages == synthesis_messages(question, draw.references.texts)
        assert prompt.original_messages == question and prompt.question == "Which colour?"
        assert prompt.sample.num_patches  # the image is re-attached
