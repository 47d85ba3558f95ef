"""The loss and RL's log-probs, an lm_head tile at a time, against the whole-logits computation."""

import pytest
import torch
from transformers.loss.loss_utils import ForCausalLMLoss

from step3vl_train.model.token_scores import chunk_count, token_scores


def full_scores(head, hidden, targets, temperature):
    logprobs = torch.log_softmax(head(hidden).float() / temperature, dim=-1)
    return logprobs.gather(-1, targets[:, None]).squeeze(-1), -(logprobs.exp() * logprobs).sum(-1)


@pytest.mark.parametrize("chunks", [1, 3, 7, 40, 64])
def test_tiles_give_the_full_log_probs_entropy_and_gradients(chunks):
    torch.manual_seed(0)
    head = torch.nn.Linear(16, 50, bias=False)
    hidden, targets, upstream = torch.randn(37, 16), torch.randint(0, 50, (37,)), torch.randn(37)
    tiled_hidden = hidden.clone().requires_grad_()
    logprobs, entropy = token_scores(head, tiled_hidden, targets, chunks, temperature=0.7, with_entropy=True)
    (logprobs * upstream).sum().backward()
    tiled_grads = tiled_hidden.grad, head.weight.grad.clone()
    head.zero_grad()
    full_hidden = hidden.clone().requires_grad_()
    expected, expected_entropy = full_scores(head, full_hidden, targets, 0.7)
    (expected * upstream).sum().backward()
    torch.testing.assert_close(logprobs, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(entropy, expected_entropy, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(tiled_grads[0], full_hidden.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(tiled_grads[1], head.weight.grad, rtol=1e-5, atol=1e-6)


def test_the_head_is_called_once_a_tile_forward_and_backward_even_when_empty():
    """Under ZeRO-3 each call gathers the head's weight, so call counts must not depend on the data."""
    head = torch.nn.Linear(8, 20, bias=False)
    calls = []
    head.register_forward_hook(lambda *_: calls.append(1))
    hidden = torch.zeros(0, 8, requires_grad=True)
    logprobs, _ = token_scores(head, hidden, torch.zeros(0, dtype=torch.long), chunks=3)
    logprobs.sum().backward()
    assert len(calls) == 6 and hidden.grad.shape == (0, 8)
    assert chunk_count(0, 4096) == 1 and chunk_count(8193, 4096) == 3 and chunk_count(5, 0) == 1


def test_model_loss_and_gradients_equal_cross_entropy_over_full_logits(tiny_model):
    """The chunked loss against transformers' own causal-LM loss on the full logits, with a global count."""
    torch.manual_seed(1)
    ids = torch.randint(11, 1000, (2, 30))
    labels = ids.clone()
    labels[:, :9] = -100
    tiny_model.runtime.compute.loss_chunk = 7
    tiny_model.train()
    loss = tiny_model(input_ids=ids, labels=labels, num_items_in_batch=torch.tensor(100)).loss
    loss.backward()
    chunked = {name: param.grad.clone() for name, param in tiny_model.named_parameters() if param.grad is not None}
    assert len(chunked) > 1
    tiny_model.zero_grad()
    logits = tiny_model(input_ids=ids).logits
    expected = ForCausalLMLoss(logits, labels, vocab_size=1024, num_items_in_batch=torch.tensor(100))
    expected.backward()
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    for name, param in tiny_model.named_parameters():
        if param.grad is not None or name in chunked:  # text only: the vision tower takes no part
            torch.testing.assert_close(chunked[name], param.grad, rtol=1e-4, atol=1e-7, msg=name)
    mean = tiny_model(input_ids=ids, labels=labels).loss
    torch.testing.assert_close(mean, expected * 100 / 42, rtol=1e-5, atol=1e-6)


def test_model_logprobs_and_entropy_over_response_positions_equal_the_full_logits(tiny_model):
    """RL's scores: log p(token t+1) at column t, at the sampling temperature, 0 outside the response."""
    torch.manual_seed(2)
    ids = torch.randint(11, 1000, (3, 20))
    mask = torch.ones(3, 20, dtype=torch.long)
    mask[1, 15:] = 0
    labels = torch.full_like(ids, -100)
    labels[:, 8:] = ids[:, 8:]
    labels[mask == 0] = -100
    tiny_model.runtime.compute.loss_chunk = 5
    with torch.no_grad():
        out = tiny_model(
            input_ids=ids, attention_mask=mask, labels=labels, logprobs_temperature=0.8, return_entropy=True
        )
        logits = tiny_model(input_ids=ids, attention_mask=mask).logits[:, :-1].float() / 0.8
    expected = torch.log_softmax(logits, -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    entropy = -(torch.softmax(logits, -1) * torch.log_softmax(logits, -1)).sum(-1)
    scored = labels[:, 1:] != -100
    assert out.loss is None and out.logits is None
    torch.testing.assert_close(out.logprobs[:, :-1][scored], expected[scored], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.entropy[:, :-1][scored], entropy[scored], rtol=1e-5, atol=1e-5)
    assert torch.all(out.logprobs[:, :-1][~scored] == 0) and torch.all(out.logprobs[:, -1] == 0)


def test_no_position_is_ever_scored_over_the_whole_vocabulary_at_once(tiny_model):
    """The head sees at most loss_chunk positions a call, and only labelled ones."""
    shapes = []
    tiny_model.lm_head.register_forward_hook(lambda _m, args, _o: shapes.append(tuple(args[0].shape)))
    tiny_model.runtime.compute.loss_chunk = 4
    ids = torch.randint(11, 1000, (2, 16))
    labels = torch.full_like(ids, -100)
    labels[:, 10:] = ids[:, 10:]
    tiny_model(input_ids=ids, labels=labels)
    assert sum(rows for rows, _ in shapes) == 2 * 6 and max(rows for rows, _ in shapes) <= 4
