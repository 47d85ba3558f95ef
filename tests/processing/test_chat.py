import pytest

from step3vl_train.processing.chat import render_chat
from step3vl_train.processing.tokenizer import SPECIAL_TOKENS, build_tiny_tokenizer, load_tokenizer
from step3vl_train.usage import UsageError

USER = {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is shown?"}]}
ASSISTANT = {"role": "assistant", "reasoning_content": "Whiskers and fur.", "content": "A cat."}


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("tiny")


def test_tiny_tokenizer_is_deterministic_with_fixed_special_ids(tokenizer):
    again = build_tiny_tokenizer()
    assert again.get_vocab() == tokenizer.get_vocab()
    assert [tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS] == list(range(len(SPECIAL_TOKENS)))
    assert len(tokenizer) <= 1024  # fits configs/model/tiny.yaml's vocab_size


def test_rendering_with_reasoning_format(tokenizer):
    ids, mask = render_chat(tokenizer, [{"role": "system", "content": "Be brief."}, USER, ASSISTANT])
    assert tokenizer.decode(ids) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\n<im_patch>What is shown?<|im_end|>\n"
        "<|im_start|>assistant\n<think>\nWhiskers and fur.\n</think>\n\nA cat.<|im_end|>\n"
    )
    trained = tokenizer.decode([i for i, m in zip(ids, mask, strict=True) if m])
    assert trained == "Whiskers and fur.\n</think>\n\nA cat.<|im_end|>"


def test_generation_prompt_opens_the_reasoning(tokenizer):
    ids, mask = render_chat(tokenizer, [USER], add_generation_prompt=True)
    assert tokenizer.decode(ids).endswith("<|im_end|>\n<|im_start|>assistant\n<think>\n")
    assert sum(mask) == 0


def test_every_assistant_turn_is_trained_and_nothing_else(tokenizer):
    second = {"role": "user", "content": "And its colour?"}
    answer = {"role": "assistant", "content": "Grey."}
    ids, mask = render_chat(tokenizer, [USER, ASSISTANT, second, answer])
    spans = "".join(tokenizer.decode([i]) if m else "\0" for i, m in zip(ids, mask, strict=True))
    assert [s for s in spans.split("\0") if s] == [
        "Whiskers and fur.\n</think>\n\nA cat.<|im_end|>",
        "\n</think>\n\nGrey.<|im_end|>",
    ]


def test_unknown_content_part_is_an_error(tokenizer):
    with pytest.raises(Exception, match="unknown content part type: video"):
        render_chat(tokenizer, [{"role": "user", "content": [{"type": "video"}]}])


def test_tokenizer_without_image_tokens_is_rejected(tmp_path):
    build_tiny_tokenizer().save_pretrained(tmp_path)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        path = tmp_path / name
        path.write_text(path.read_text().replace("<patch_newline>", "<patch_nl>"))
    with pytest.raises(ValueError, match="lacks special tokens: <patch_newline>"):
        load_tokenizer(str(tmp_path))


@pytest.mark.parametrize("path", ["outputs/no_such_model", "/models/no_such_model", "Qwen/Qwen3-8B"])
def test_a_tokenizer_path_that_is_no_directory_is_named_at_once(path):
    """Before: a repo-id error for an absolute path, and a 51 s wait on the hub for a relative one."""
    with pytest.raises(UsageError, match=f"tokenizer={path}: no such directory. Give a local model"):
        load_tokenizer(path)


def test_a_directory_without_a_tokenizer_is_named(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ValueError, match=f"tokenizer={tmp_path}: no tokenizer can be read from it"):
        load_tokenizer(str(tmp_path))
