"""RL prompts: samples of the data schema (`messages` ending with a user turn, `answer`, `reward`) read
from shards, JSONL or HF datasets, mixed by prompt counts, turned into model inputs. Its state (each
source's position and the mixture's counts) is part of the RL checkpoint: a resumed run neither repeats
nor skips a prompt."""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict

from rl.config import PromptsConfig
from rl.experience import Prompt
from step3vl_train.data.mixture import TokenMixture
from step3vl_train.data.schema import Sample
from step3vl_train.data.skips import SkipLog, SkippedSample
from step3vl_train.data.sources import SourceCursor, SourceReader, resolve_shards
from step3vl_train.processing.images import ImageError, load_image
from step3vl_train.processing.placeholders import PlaceholderMismatchError
from step3vl_train.processing.processor import Step3VLProcessor


class PromptLoader:
    def __init__(
        self,
        config: PromptsConfig,
        processor: Step3VLProcessor,
        default_reward: str | None = None,
        max_epochs: int | None = None,
    ):
        """`max_epochs` None repeats the sources forever (training); 1 reads each once (offline tools)."""
        self.config = config
        self.processor = processor
        self.default_reward = default_reward
        self.readers = {
            source.name: SourceReader(source, resolve_shards(source, config.root), 0, 1, config.seed, max_epochs)
            for source in config.sources
        }
        self.exhausted: set[str] = set()
        # The mixture counts prompts: each source's share of the prompts follows its weight.
        self.mixture = TokenMixture([s.name for s in config.sources], [s.weight for s in config.sources])
        self.skips: Counter[str] = Counter()  # encounters by reason; skip_log.unique() counts distinct keys
        self.skip_log = SkipLog()

    def next_batch(self, size: int) -> list[Prompt]:
        """`size` prompts, or fewer once every source has been read `max_epochs` times."""
        prompts = []
        while len(prompts) < size and len(self.exhausted) < len(self.readers):
            name = self.mixture.pick(set(self.readers) - self.exhausted)
            item = self.readers[name].next()
            if item is None:
                self.exhausted.add(name)
                continue
            try:
                if isinstance(item, SkippedSample):
                    raise item
                prompts.append(self.prepare(item, name))
            except SkippedSample as skip:
                self.skip_log.record(skip.record(name))
                self.skips[skip.reason] += 1
                if sum(self.skips.values()) > 1000 and not prompts:
                    raise RuntimeError(
                        f"prompt sources yield nothing usable; skips so far: {dict(self.skips)}"
                    ) from skip
                continue
            self.mixture.add(name, 1)
        return prompts

    def prepare(self, sample: Sample, source: str) -> Prompt:
        if sample.messages is None or sample.messages[-1]["role"] != "user":
            raise SkippedSample("bad_schema", sample.key, "an RL prompt needs `messages` ending with a user turn")
        reward = self.default_reward or sample.reward
        if not reward:
            raise SkippedSample("bad_schema", sample.key, "no `reward` field and no reward.fn")
        try:
            images = [load_image(data, sample.key) for data in sample.images]
        except ImageError as error:
            raise SkippedSample("corrupt_image", sample.key, str(error)) from error
        try:
            processed = self.processor(sample.messages, images, add_generation_prompt=True, sample=sample.key)
        except PlaceholderMismatchError as error:
            raise SkippedSample("placeholder_mismatch", sample.key, str(error)) from error
        if len(processed.input_ids) > self.config.max_prompt_tokens:
            raise SkippedSample(
                "too_long", sample.key, f"{len(processed.input_ids)} > {self.config.max_prompt_tokens} prompt tokens"
            )
        return Prompt(
            key=sample.key,
            task=source,
            sample=processed,
            messages=sample.messages,
            images=sample.images,
            reward=reward,
            answer=sample.answer,
            boxes=sample.boxes,
            points=sample.points,
            image_size=images[0].size if images else None,
            question=question_text(sample.messages),
            reference=sample.reference,
        )

    def state_dict(self) -> dict:
        return {
            "cursors": {name: asdict(reader.cursor) for name, reader in self.readers.items()},
            "mixture": self.mixture.state_dict(),
            "skips": dict(self.skips),
            "skipped_keys": dict(self.skip_log.seen),
        }

    def load_state_dict(self, state: dict) -> None:
        if set(state["cursors"]) != set(self.readers):
            raise ValueError(
                f"checkpoint has prompt sources {sorted(state['cursors'])}, the config {sorted(self.readers)}"
            )
        for name, cursor in state["cursors"].items():
            self.readers[name].restore(SourceCursor(**cursor))
        self.mixture.load_state_dict(state["mixture"])
        self.skips = Counter(state["skips"])
        self.skip_log.seen = dict(state.get("skipped_keys", {}))  # absent from states before unique counts


def question_text(messages: list[dict]) -> str:
    parts = []
    for message in messages:
        content = message["content"]
        if isinstance(content, str):
            parts.append(content)
        else:
            parts += [part["text"] for part in content if part.get("type") == "text"]
    return "\n".join(parts)
