"""Tokenizers: a user's tokenizer directory, or the tiny byte-level BPE the project trains for CPU runs.

There is no model hub here, so tests and the demo use `load_tokenizer("tiny")`: a BPE trained in well
under a second on a corpus shipped with the package, carrying STEP3-VL's special tokens at fixed ids.
"""

from __future__ import annotations

from functools import lru_cache
from importlib import resources
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from step3vl_train.usage import UsageError

# Qwen's text specials, then the image specials. The tiny tokenizer puts them at ids 0..10, so
# `<im_patch>` is id 5 there (configs/model/tiny.yaml's image_token_id).
SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<think>",
    "</think>",
    "<im_patch>",
    "<im_start>",
    "<im_end>",
    "<patch_start>",
    "<patch_end>",
    "<patch_newline>",
)
TINY_VOCAB_SIZE = 1024


@lru_cache(maxsize=1)
def _train_tiny_bpe() -> Tokenizer:
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TINY_VOCAB_SIZE,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    corpus = resources.files("step3vl_train.processing") / "assets" / "tiny_corpus.txt"
    bpe.train_from_iterator(corpus.read_text().splitlines(), trainer=trainer)
    return bpe


def build_tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A fresh tiny tokenizer (deterministic: same corpus, same vocabulary)."""
    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_train_tiny_bpe().to_str()),
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=list(SPECIAL_TOKENS[3:]),
    )


def load_tokenizer(source: str) -> PreTrainedTokenizerBase:
    """`"tiny"` for the built-in tokenizer, else a local tokenizer directory (e.g. the released checkpoint's).
    Nothing is fetched from a hub: anything else is an error naming it, at once."""
    if source == "tiny":
        tokenizer = build_tiny_tokenizer()
    else:
        tokenizer = _read_tokenizer(source)
    missing = [t for t in SPECIAL_TOKENS if t not in tokenizer.get_vocab()]
    if missing:
        raise UsageError(f"tokenizer {source!r} lacks special tokens: {', '.join(missing)}")
    return tokenizer


def _read_tokenizer(source: str) -> PreTrainedTokenizerBase:
    wanted = "a local model directory with its tokenizer (the released checkpoint, an export), or tiny"
    if not Path(source).is_dir():
        raise UsageError(f"tokenizer={source}: no such directory. Give {wanted}.")
    try:
        return AutoTokenizer.from_pretrained(source, local_files_only=True)
    except (OSError, ValueError) as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise UsageError(f"tokenizer={source}: no tokenizer can be read from it ({reason}). Give {wanted}.") from None
