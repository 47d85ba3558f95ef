"""RL prompts: samples of the data schema (`messages` ending with a user turn, `answer`, `reward`) read
from shards, JSONL or HF datasets, mixed by prompt counts, turned into model inputs. Its state (each
source's position and the mixture's counts) is part of the RL checkpoint: a resumed run neither repeats
nor skips a prompt.

PaCoRe (`stage=pacore`): each prompt is a synthesis round. Its messages are drawn from the sample's `pool`
seeded by (pacore.seed, iteration, key), so a resumed run gives every prompt the same ones; the rendered
synthesis prompt replaces the text of the last user message, whose images stay."""

from __future__ import annotations

from collections import Counter
from functools import partial

from rl.config import PromptsConfig, RLConfig
from rl.experience import Prompt, SynthesisInfo
from rl.pacore.config import PaCoReConfig
from rl.pacore.messages import Compactor, draw_messages
from rl.pacore.template import original_prompt, synthesis_messages
from step3vl_train.data.mixed import MixedSamples
from step3vl_train.data.schema import Sample
from step3vl_train.data.skips import SkippedSample
from step3vl_train.data.sources import record_key
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
        pacore: PaCoReConfig | None = None,
        keep_pools: bool = False,
    ):
        """`max_epochs` None repeats the sources forever (training); 1 reads each once (offline tools).
        `pacore`: the prompts are PaCoRe synthesis rounds, their messages drawn from each sample's pool.
        `keep_pools`: each Prompt carries its sample's whole pool (the filters write it out); training
        leaves it behind, so that it does not travel to the actors with every prompt."""
        self.config = config
        self.processor = processor
        self.default_reward = default_reward
        self.samples = MixedSamples(config.sources, config.root, seed=config.seed, max_epochs=max_epochs)
        self.compactor = Compactor(pacore, processor.tokenizer) if pacore is not None else None
        self.keep_pools = keep_pools

    @property
    def skips(self) -> Counter[str]:
        """Skipped prompts by reason (encounters)."""
        return self.samples.skips

    def next_batch(self, size: int, step: int = 0) -> list[Prompt]:
        """`size` prompts, or fewer once every source has been read `max_epochs` times. `step`: the RL
        iteration, which seeds a PaCoRe prompt's draw of messages."""
        return self.samples.take(size, partial(self.prepare, step=step), "prompt")

    def prepare(self, sample: Sample, source: str, step: int = 0) -> Prompt:
        if sample.messages is None or sample.messages[-1]["role"] != "user":
            raise SkippedSample("bad_schema", sample.key, "an RL prompt needs `messages` ending with a user turn")
        reward = self.default_reward or sample.reward
        if not reward:
            raise SkippedSample("bad_schema", sample.key, "no `reward` field and no reward.fn")
        images = sample_images(sample)
        messages, synthesis = sample.messages, None
        if self.compactor is not None:
            messages, synthesis = self.synthesis(sample, step)
        try:
            processed = self.processor(messages, images, add_generation_prompt=True, sample=sample.key)
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
            messages=messages,
            images=sample.images,
            reward=reward,
            answer=sample.answer,
            boxes=sample.boxes,
            points=sample.points,
            image_size=images[0].size if images else None,
            question=question_text(sample.messages),
            reference=sample.reference,
            original_messages=sample.messages if synthesis is not None else None,
            pool=sample.pool if self.keep_pools else [],
            synthesis=synthesis,
        )

    def synthesis(self, sample: Sample, step: int) -> tuple[list[dict], SynthesisInfo]:
        """The synthesis conversation of a PaCoRe prompt at this step, and the messages it was given."""
        config = self.compactor.config
        problem = original_prompt(sample.messages)
        draw = draw_messages(self.compactor, problem, sample.pool, config.seed, step, record_key(sample.key))
        if config.messages[1] > 0 and not draw.usable:
            raise SkippedSample("no_messages", sample.key, "its `pool` holds no message a synthesis may be given")
        if draw.references.skipped:
            raise SkippedSample("too_long", sample.key, "its references exceed pacore.max_synthesis_tokens")
        info = SynthesisInfo(draw.indices, draw.message_reward, dict(draw.references.dropped))
        return synthesis_messages(sample.messages, draw.references.texts), info

    def state_dict(self) -> dict:
        return self.samples.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.samples.load_state_dict(state, "prompt")


def sample_images(sample: Sample) -> list:
    """The sample's images, decoded; one that does not decode skips the sample (corrupt_image)."""
    try:
        return [load_image(data, sample.key) for data in sample.images]
    except ImageError as error:
        raise SkippedSample("corrupt_image", sample.key, str(error)) from error


def prompt_loader(
    cfg: RLConfig, processor: Step3VLProcessor, max_epochs: int | None = None, keep_pools: bool = False
) -> PromptLoader:
    """The loader of an RL config's prompts: PaCoRe synthesis rounds under `stage=pacore`."""
    pacore = cfg.pacore if cfg.stage == "pacore" else None
    return PromptLoader(cfg.prompts, processor, cfg.reward.fn, max_epochs, pacore, keep_pools)


def question_text(messages: list[dict]) -> str:
    parts = []
    for message in messages:
        content = message["content"]
        if isinstance(content, str):
            parts.append(content)
        else:
            parts += [part["text"] for part in content if part.get("type") == "text"]
    return "\n".join(parts)
