"""The transformers rollout engine: sampling, its log-probs against the trainer's computation, weight loads."""

import io

import pytest
import torch
from PIL import Image

from rl.engines import SamplingParams
from rl.engines.hf import HFEngine
from rl.experience import Prompt, sequence_batch
from step3vl_train.model import Step3VLForConditionalGeneration


def image_prompt(processor, size=(400, 300), text="What is it?") -> Prompt:
    image = Image.new("RGB", size, "blue")
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]
    sample = processor(messages, [image], add_generation_prompt=True)
    return Prompt("k", "t", sample, messages, [buffer.getvalue()], "math", answer="1", image_size=size)


def text_prompt(processor, text="Hi there, how are you today?") -> Prompt:
    messages = [{"role": "user", "content": text}]
    return Prompt("k2", "t", processor(messages, add_generation_prompt=True), messages, [], "math", answer="1")


def forward_logprobs(model, prompt: Prompt, tokens: list[int], temperature: float) -> torch.Tensor:
    """The trainer's computation: one forward pass over prompt + response, the head on the response only."""
    sequences = sequence_batch([(prompt.sample, tokens)], pad_token_id=0)
    with torch.no_grad():
        out = model(
            **sequences.batch.model_inputs(with_labels=False),
            labels=sequences.response_labels(),
            logprobs_temperature=temperature,
        )
    return sequences.gather(out.logprobs[:, :-1])[0]


@pytest.fixture
def engine(exported_tiny_model):
    return HFEngine({}, str(exported_tiny_model), pad_token_id=0, batch_size=3)


def test_completions_and_their_logprobs_match_a_forward_pass(engine, exported_tiny_model, tiny_processor):
    prompts = [image_prompt(tiny_processor), text_prompt(tiny_processor), image_prompt(tiny_processor, (90, 120))]
    stop = tiny_processor.tokenizer.convert_tokens_to_ids("<|im_end|>")
    sampling = SamplingParams(n=2, temperature=0.7, max_new_tokens=12, stop_token_ids=[stop])
    encoded = []
    engine.model.vision_model.register_forward_hook(lambda _m, args, _o: encoded.append(len(args[0])))
    completions = engine.generate(prompts, sampling, seed=3)
    assert [len(group) for group in completions] == [2, 2, 2]
    # Each image prompt's views (global + crops) went through the tower once for its 2 rows.
    views = [len(p.sample.num_patches) + sum(p.sample.num_patches) for p in (prompts[0], prompts[2])]
    assert sum(encoded) == sum(views) and views[0] > 1
    model = Step3VLForConditionalGeneration.from_pretrained(exported_tiny_model).eval()
    for prompt, group in zip(prompts, completions, strict=True):
        for completion in group:
            assert 0 < len(completion.token_ids) <= 12
            if completion.finish_reason == "stop":
                assert completion.token_ids[-1] == stop and stop not in completion.token_ids[:-1]
            else:
                assert len(completion.token_ids) == 12 and stop not in completion.token_ids
            expected = forward_logprobs(model, prompt, completion.token_ids, 0.7)
            assert torch.allclose(torch.tensor(completion.logprobs), expected, atol=1e-5)


def test_sampling_follows_the_seed(engine, tiny_processor):
    prompts = [text_prompt(tiny_processor)]
    sampling = SamplingParams(n=3, max_new_tokens=10)
    first, again, other = (engine.generate(prompts, sampling, seed) for seed in (1, 1, 2))
    tokens = [[c.token_ids for c in result[0]] for result in (first, again, other)]
    assert tokens[0] == tokens[1] and tokens[0] != tokens[2]


def test_weight_loads_are_checked(engine):
    params = dict(engine.model.named_parameters())
    names = sorted(params)
    engine.load_weights({name: torch.zeros_like(params[name]) for name in names[:3]})
    with pytest.raises(RuntimeError, match="first weight sync left"):
        engine.finish_weight_update()
    with pytest.raises(KeyError, match="does not have"):
        engine.load_weights({"no.such.weight": torch.zeros(1)})
    engine.load_weights({name: p.detach().clone() for name, p in params.items()})
    assert engine.finish_weight_update() == len(names)
    assert all(params[name].abs().sum() > 0 for name in names[3:])
    # Once complete, a sync may send the trainable tensors alone.
    engine.load_weights({name: params[name].detach().clone() for name in names[:3]})
    assert engine.finish_weight_update() == 3


def test_image_tokens_are_never_sampled(engine, tiny_processor):
    im_patch = tiny_processor.image_token_ids.im_patch
    with torch.no_grad():  # make <im_patch> by far the likeliest token everywhere
        engine.model.lm_head.weight[im_patch] = engine.model.lm_head.weight.abs().max(0).values * 50
    prompts = [text_prompt(tiny_processor)]
    free = engine.generate(prompts, SamplingParams(n=2, max_new_tokens=6), seed=0)
    assert im_patch in free[0][0].token_ids
    suppressed = engine.generate(prompts, SamplingParams(n=2, max_new_tokens=6, suppressed_token_ids=[im_patch]), 0)
    assert all(im_patch not in c.token_ids for c in suppressed[0])


def test_a_paused_generation_goes_on_from_its_tokens(engine, exported_tiny_model, tiny_processor):
    """rollout.partial: a pause (here at the 5th decoding step) ends the generation with every row "paused";
    continued, each row keeps its tokens and log-probs and finishes its budget, and every log-prob is the
    trainer's for the whole response (the continuation sees prompt + prefix). With groups, the call
    returns once `enough` of them are whole, the rest paused."""
    prompts = [image_prompt(tiny_processor), text_prompt(tiny_processor)]
    sampling = SamplingParams(n=1, temperature=0.7, max_new_tokens=12)  # no stop token: every row runs 12
    steps = []

    def count(_module, _args):
        steps.append(1)
        if len(steps) == 5:
            engine.pause_generation()

    hook = engine.model.register_forward_pre_hook(count)
    paused = engine.generate_rows([(p, None) for p in prompts], sampling, seed=1)
    assert [(c.finish_reason, len(c.token_ids), len(c.logprobs)) for c in paused] == [("paused", 5, 5)] * 2
    assert [c.finish_reason for c in engine.generate_rows([(prompts[0], paused[0])], sampling, 1)] == ["paused"]
    engine.resume_generation()
    hook.remove()
    done = engine.generate_rows(list(zip(prompts, paused, strict=True)), sampling, seed=2)
    model = Step3VLForConditionalGeneration.from_pretrained(exported_tiny_model).eval()
    for prompt, before, after in zip(prompts, paused, done, strict=True):
        assert after.finish_reason == "length" and len(after.token_ids) == 12
        assert after.token_ids[:5] == before.token_ids and after.logprobs[:5] == before.logprobs
        expected = forward_logprobs(model, prompt, after.token_ids, 0.7)
        assert torch.allclose(torch.tensor(after.logprobs), expected, atol=1e-5)

    # group 0's row needs 2 more tokens, group 1's 12: the call returns when group 0 is whole
    rows = [(prompts[0], done[0]), (prompts[1], None)]
    done[0].token_ids, done[0].logprobs, done[0].finish_reason = done[0].token_ids[:10], done[0].logprobs[:10], "paused"
    first = engine.generate_rows(rows, sampling, seed=3, groups=[7, 9], enough=1)
    assert [(c.finish_reason, len(c.token_ids)) for c in first] == [("length", 12), ("paused", 2)]
