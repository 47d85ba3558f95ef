"""A group's shared prompt computed once (algo.shared_prompt): the mask the packed kernels read from the
position ids, flex attention's block mask against the dense one, the rows the worker forms, and the
policy's log-probs, entropies and loss, the critic's values and loss, and both gradients, equal to a row a
response (fp32, 1e-5) on text and image prompts with responses of unequal length, a group split over rows.
The 2-rank TrainWorker comparison is in tests/rl/test_micro_batches.py."""

import io
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from rl.algos.losses import GlobalCounts, policy_loss, value_loss
from rl.experience import Prompt, sequence_batch, shared_sequence_batch
from rl.micro_batches import enough_rows, response_rows, shared_row_length
from step3vl_train.model import Step3VLForConditionalGeneration
from step3vl_train.model.attention import PackedLayout, flex_packed_attention, sdpa_packed_attention
from step3vl_train.model.value import Step3VLForValue
from tests.rl.test_engines import text_prompt


def test_a_continuing_sample_sees_the_prompt_and_itself_only():
    # a 4-token prompt (less its last token), a response of 3 after a copy of that token, one of 2, then an
    # unrelated sample of 3 (a packed neighbour, or the padding after a row)
    positions = torch.tensor([[0, 1, 2, 3, 4, 5, 6, 7, 4, 5, 6, 0, 1, 2]])
    index = torch.arange(14)
    allowed = PackedLayout.of(positions).allows(0, index[:, None], index)
    expected = torch.zeros(14, 14, dtype=torch.bool)
    expected[:8, :8] = torch.ones(8, 8).tril().bool()  # the prompt and the first response: causal
    expected[8:11, :4] = True  # the second response sees the prompt...
    expected[8:11, 8:11] = torch.ones(3, 3).tril().bool()  # ...and itself, not the first response
    expected[11:, 11:] = torch.ones(3, 3).tril().bool()
    assert torch.equal(allowed, expected)
    assert PackedLayout.of(torch.arange(6)[None]).is_causal
    assert not PackedLayout.of(positions).is_causal


def test_flex_attention_with_the_block_mask_equals_the_per_sample_kernel():
    """Forward only: flex attention has no backward on the CPU (its own, on GPUs, is benchmarks/gpu's). The
    block mask is built once for equal position ids (a fresh tensor a layer under Ulysses), again for others."""
    torch.manual_seed(0)
    positions = torch.tensor([[0, 1, 2, 3, 4, 5, 6, 7, 4, 5, 6, 0, 1, 2, 0, 1]] * 2)
    positions[1] = torch.arange(16)
    other = torch.tensor([[0, 1, 2, 3, 4, 5, 2, 3, 4, 2, 3, 4, 5, 6, 0, 1]] * 2)
    query, key, value = torch.randn(2, 4, 16, 8), torch.randn(2, 2, 16, 8), torch.randn(2, 2, 16, 8)
    for position_ids in (positions, positions.clone(), other, positions):
        dense, _ = sdpa_packed_attention(torch.nn.Module(), query, key, value, None, position_ids=position_ids)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # eager flex on the CPU says it is unfused
            flex, _ = flex_packed_attention(torch.nn.Module(), query, key, value, None, position_ids=position_ids)
        torch.testing.assert_close(flex, dense, rtol=1e-5, atol=1e-6)


def test_a_group_fills_rows_within_the_budget_and_a_rank_splits_rows_to_agree():
    keys, prompts, lengths = ["a"] * 4 + ["b"] * 2, [10] * 6, [5, 6, 7, 8, 3, 3]
    # the prompt less its last token (9) + (5 + 1) + (6 + 1) = 22 <= 29; adding (7 + 1) would be 30: a new row,
    # which repeats the prompt
    assert shared_row_length(10, [5, 6]) == 22 and shared_row_length(10, [5]) == 15  # 15: prompt + response
    assert response_rows(keys, prompts, lengths, 29, shared=True) == [[0, 1], [2, 3], [4, 5]]
    assert response_rows(keys, prompts, lengths, 29, shared=False) == [[i] for i in range(6)]
    assert response_rows(keys, prompts, [40, 1, 1, 1, 1, 1], 29, shared=True)[:2] == [[0], [1, 2, 3]]  # too long
    # another rank needs 4 forwards where this one has 2 rows: its longest rows of several are cut in two
    assert enough_rows([[0, 1, 2, 3], [4]], 4, len) == [[0], [1], [2, 3], [4]]


def noise_prompt(processor, size=(300, 200)) -> Prompt:
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]}]
    sample = processor(messages, [image], add_generation_prompt=True)
    return Prompt("img", "t", sample, messages, [buffer.getvalue()], "math")


def packed(model_class, config):
    torch.manual_seed(0)
    return model_class._from_config(config, attn_implementation={"text_config": "sdpa_packed"}).eval()


@pytest.mark.parametrize("kind", ["text", "image"])
def test_shared_rows_give_a_row_each_numbers_and_gradients(tiny_config, tiny_processor, kind):
    prompt = noise_prompt(tiny_processor) if kind == "image" else text_prompt(tiny_processor)
    generator = torch.Generator().manual_seed(1)
    lengths = [7, 3, 60, 5, 9]  # one longer than the prompt: the kernel takes the other way for it
    responses = [torch.randint(11, 500, (n,), generator=generator).tolist() for n in lengths]
    old = [-torch.rand(n, generator=generator) for n in lengths]
    advantages = [torch.randn(n, generator=generator) for n in lengths]
    returns = [torch.randn(n, generator=generator) for n in lengths]
    counts = GlobalCounts(tokens=sum(lengths), sequences=len(lengths))
    policy, critic = packed(Step3VLForConditionalGeneration, tiny_config), packed(Step3VLForValue, tiny_config)
    order = [0, 1, 2, 3, 4]  # the rows' order of the responses
    layouts = {
        "a row each": sequence_batch([(prompt.sample, r) for r in responses], 0),
        # three in one row, two in another: a group split over rows, each repeating the prompt
        "shared": shared_sequence_batch([(prompt.sample, responses[:3]), (prompt.sample, responses[3:])], 0),
    }
    results = {}
    for name, sequences in layouts.items():
        policy.zero_grad(), critic.zero_grad()
        inputs = sequences.batch.model_inputs(with_labels=False)
        out = policy(**inputs, labels=sequences.response_labels(), logprobs_temperature=0.7, return_entropy=True)
        logprobs, entropy = out.logprobs[:, :-1], out.entropy[:, :-1]
        mask = sequences.response_mask.float()
        old_rows = sequences.scatter([old[i] for i in order])
        loss, _ = policy_loss(
            logprobs, old_rows, old_rows, sequences.scatter([advantages[i] for i in order]), mask, counts,
            aggregation="seq-mean-token-mean", responses=sequences.response_index,
        )  # fmt: skip
        loss.backward()
        values = critic(**inputs)[:, :-1]
        critic_loss = value_loss(
            values, values.detach(), sequences.scatter([returns[i] for i in order]), mask, counts,
            aggregation="seq-mean-token-sum", responses=sequences.response_index,
        )  # fmt: skip
        critic_loss.backward()
        results[name] = {
            "logprobs": sequences.gather(logprobs),
            "entropy": sequences.gather(entropy),
            "values": sequences.gather(values),
            "losses": torch.stack([loss, critic_loss]).detach(),
            "grads": [p.grad.clone() for model in (policy, critic) for p in model.parameters() if p.grad is not None],
        }
    reference, shared = results["a row each"], results["shared"]
    assert layouts["shared"].batch.input_ids.numel() < layouts["a row each"].batch.input_ids.numel()
    for key in ("logprobs", "entropy", "values"):
        for got, expected in zip(shared[key], reference[key], strict=True):
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(shared["losses"], reference["losses"], rtol=1e-5, atol=1e-6)
    assert len(shared["grads"]) == len(reference["grads"]) and any(g.abs().sum() > 0 for g in reference["grads"])
    for got, expected in zip(shared["grads"], reference["grads"], strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
