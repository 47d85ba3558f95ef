"""Packed rows flattened for varlen kernels and sliced for sequence parallelism; the attention choice."""

import pytest
import torch

from step3vl_train.model.compute import AttentionChoiceError, resolve_attention
from step3vl_train.model.sequence import IGNORE_INDEX, local_sequence, shift_targets


def packed_rows():
    """Two packed rows: samples of 5 + 4 tokens (and 2 of padding), and 7 + 4."""
    position_ids = torch.tensor([[0, 1, 2, 3, 4, 0, 1, 2, 3, 0, 1], [0, 1, 2, 3, 4, 5, 6, 0, 1, 2, 3]])
    input_ids = torch.randint(11, 1000, (2, 11), generator=torch.Generator().manual_seed(0))
    input_ids[0, 2:4] = 5  # two image tokens in the first row, one in the second
    input_ids[1, 8] = 5
    labels = input_ids.clone()
    labels[position_ids == 0] = IGNORE_INDEX
    labels[0, 9:] = IGNORE_INDEX
    return input_ids, position_ids, labels


def test_flattening_keeps_every_target_with_its_position():
    input_ids, position_ids, labels = packed_rows()
    targets = shift_targets(labels)
    local = local_sequence(input_ids, None, position_ids, targets, image_token_id=5, flatten=True)
    assert local.input_ids.shape == (1, 22) and local.is_whole
    assert torch.equal(local.targets.reshape(2, 11), targets) and local.image_tokens == 3
    padded = local_sequence(input_ids, torch.ones_like(input_ids), None, targets, 5, flatten=True)
    assert padded.input_ids.shape == (2, 11)  # padded rows are never flattened


def test_sequence_parallel_slices_cover_the_row_once_with_their_image_tokens():
    input_ids, position_ids, labels = packed_rows()
    targets = shift_targets(labels)
    slices = [local_sequence(input_ids, None, position_ids, targets, 5, shard=(rank, 3)) for rank in range(3)]
    assert [s.input_ids.shape[1] for s in slices] == [8, 8, 8]  # 22 tokens padded to 24
    assert torch.equal(torch.cat([s.input_ids for s in slices], 1)[0, :22], input_ids.reshape(-1))
    assert torch.equal(torch.cat([s.targets for s in slices], 1)[0, :22], targets.reshape(-1))
    assert torch.all(torch.cat([s.targets for s in slices], 1)[0, 22:] == IGNORE_INDEX)
    assert [(s.image_tokens_before, s.image_tokens) for s in slices] == [(0, 2), (2, 0), (2, 1)]
    assert torch.equal(slices[2].position_ids[0, -2:], torch.tensor([0, 1]))  # the padding is its own sample
    with pytest.raises(ValueError, match="packed rows"):
        local_sequence(input_ids, torch.ones_like(input_ids), None, targets, 5, shard=(0, 2))


def test_flattened_rows_through_the_reference_kernel_equal_transformers_packed_mask(tiny_model, monkeypatch):
    """Packed rows as one flattened row under `sdpa_packed` (which finds the samples in the position ids,
    as flash-attention's varlen path does) give transformers' block-diagonal sdpa results."""
    input_ids, position_ids, labels = packed_rows()
    input_ids[input_ids == 5] = 7  # no images here
    with torch.no_grad():
        expected = tiny_model(input_ids=input_ids, position_ids=position_ids).logits
        loss = tiny_model(input_ids=input_ids, position_ids=position_ids, labels=labels).loss
        tiny_model.set_attn_implementation("sdpa_packed")
        monkeypatch.setattr(type(tiny_model.runtime), "flattens_packed_rows", lambda self, kernel: True)
        flattened = tiny_model(input_ids=input_ids, position_ids=position_ids, labels=labels).loss
        unflattened = tiny_model(input_ids=input_ids, position_ids=position_ids).logits
    torch.testing.assert_close(flattened, loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(unflattened, expected, rtol=1e-5, atol=1e-5)
    # Without the position ids' sample boundaries the rows would leak: the kernel is doing the work.
    with torch.no_grad():
        leaky = tiny_model(input_ids=input_ids, position_ids=torch.arange(11).expand(2, 11), labels=labels).loss
    assert abs(float(leaky) - float(loss)) > 1e-3


@pytest.mark.parametrize(
    "requested,device,sp,flash,shared,chosen",
    [
        ("auto", "cpu", 1, False, False, "sdpa"),
        ("auto", "cpu", 2, False, False, "sdpa_packed"),
        ("auto", "cuda", 1, True, False, "flash_attention_2"),
        ("auto", "cuda", 1, False, False, "flex_attention"),
        ("auto", "cuda", 4, True, False, "flash_attention_2"),
        ("auto", "cuda", 4, False, False, "flex_packed"),  # flex reading the samples from the position ids
        ("flex_attention", "cuda", 1, False, False, "flex_attention"),
        ("auto", "cpu", 1, False, True, "sdpa_packed"),  # RL's shared prompts: a packed kernel
        ("auto", "cuda", 4, True, True, "flex_packed"),
    ],
)
def test_the_kernel_for_the_device(monkeypatch, requested, device, sp, flash, shared, chosen):
    monkeypatch.setattr("step3vl_train.model.compute._flash_attn_installed", lambda: flash)
    assert resolve_attention(requested, device, sp, shared) == chosen


@pytest.mark.parametrize(
    "requested,device,sp,flash,shared,reason",
    [
        ("sdpa", "cuda", 1, True, False, "L x L"),  # a materialised mask at 128K
        ("sdpa_packed", "cuda", 2, True, False, "L x L"),
        ("flex_attention", "cuda", 2, True, False, "Ulysses drops"),  # flex's own mask: samples would mix
        ("flash_attention_2", "cuda", 1, False, False, "pip install flash-attn"),
        ("flash_attention_2", "cpu", 1, True, False, "GPU kernel"),
        ("flex_packed", "cpu", 1, False, True, "GPU kernel"),
        ("flash_attention_2", "cuda", 1, True, True, "algo.shared_prompt"),  # no mask for a shared prompt
        ("sdpa", "cpu", 1, False, True, "algo.shared_prompt"),
    ],
)
def test_kernels_that_cannot_keep_samples_apart_or_fit_are_refused(
    monkeypatch, requested, device, sp, flash, shared, reason
):
    monkeypatch.setattr("step3vl_train.model.compute._flash_attn_installed", lambda: flash)
    with pytest.raises(AttentionChoiceError, match=reason):
        resolve_attention(requested, device, sp, shared)
