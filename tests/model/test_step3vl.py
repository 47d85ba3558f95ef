import pytest
import torch
import torch.nn.functional as F
from transformers import Qwen3ForCausalLM

from step3vl_train.model import ImageTokenMismatchError

IMAGE = 5  # tiny image_token_id
GLOBAL, CROP = 16, 9  # tiny tokens per global view / crop (224 px, 168 px)


def sample(n_text: int, crops_per_image: list[int], seed: int) -> dict:
    """A token sequence with the right number of <im_patch> slots for the given images, plus pixels."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(11, 1000, (n_text,), generator=g).tolist()
    for crops in crops_per_image:
        ids += [1] + [IMAGE] * (crops * CROP + GLOBAL) + [2]
    out = {"input_ids": torch.tensor(ids), "num_patches": crops_per_image}
    out["pixel_values"] = torch.randn(len(crops_per_image), 3, 224, 224, generator=g) if crops_per_image else None
    n_crops = sum(crops_per_image)
    out["patch_pixel_values"] = torch.randn(n_crops, 3, 168, 168, generator=g) if n_crops else None
    return out


def collate_right_padded(samples: list[dict]) -> dict:
    length = max(len(s["input_ids"]) for s in samples)
    ids = torch.zeros(len(samples), length, dtype=torch.long)
    mask = torch.zeros(len(samples), length, dtype=torch.long)
    for row, s in enumerate(samples):
        ids[row, : len(s["input_ids"])] = s["input_ids"]
        mask[row, : len(s["input_ids"])] = 1
    cat = lambda key: torch.cat([s[key] for s in samples if s[key] is not None])  # noqa: E731
    return {
        "input_ids": ids,
        "attention_mask": mask,
        "pixel_values": cat("pixel_values"),
        "patch_pixel_values": cat("patch_pixel_values"),
        "num_patches": [n for s in samples for n in s["num_patches"]],
    }


def test_text_only_logits_equal_transformers_qwen3(tiny_model):
    reference = Qwen3ForCausalLM(tiny_model.config.text_config).eval()
    reference.model.load_state_dict(tiny_model.model.state_dict())
    reference.lm_head.load_state_dict(tiny_model.lm_head.state_dict())
    ids = torch.randint(11, 1000, (2, 23))
    with torch.no_grad():
        torch.testing.assert_close(tiny_model(input_ids=ids).logits, reference(input_ids=ids).logits, rtol=0, atol=0)


def test_mixed_batch_equals_each_sample_alone(tiny_model):
    samples = [sample(7, [], 0), sample(5, [0], 1), sample(3, [2, 0], 2), sample(4, [1], 3)]
    batch = collate_right_padded(samples)
    with torch.no_grad():
        batched = tiny_model(**batch).logits
        for row, s in enumerate(samples):
            alone = tiny_model(
                input_ids=s["input_ids"][None],
                pixel_values=s["pixel_values"],
                patch_pixel_values=s["patch_pixel_values"],
                num_patches=s["num_patches"],
            ).logits
            torch.testing.assert_close(batched[row, : alone.shape[1]], alone[0], rtol=1e-5, atol=1e-5)


def test_image_tokens_land_crops_first_then_global(tiny_model, monkeypatch):
    """Each view's tokens are tagged with the view's index so the merged order can be read back."""

    def tagged(pixel_values, checkpoint_blocks=False):
        tag = pixel_values[:, 0, 0, 0]
        tokens = (pixel_values.shape[-1] // 56) ** 2
        return tag[:, None, None].expand(-1, tokens, tiny_model.config.hidden_size)

    monkeypatch.setattr(tiny_model, "encode_images", tagged)
    globals_ = torch.tensor([100.0, 200.0])[:, None, None, None].expand(2, 3, 224, 224)
    crops = torch.tensor([1.0, 2.0, 3.0])[:, None, None, None].expand(3, 3, 168, 168)
    merged = tiny_model.image_embeddings(globals_, crops, [2, 1])[0][:, 0].tolist()
    assert merged == [1.0] * CROP + [2.0] * CROP + [100.0] * GLOBAL + [3.0] * CROP + [200.0] * GLOBAL


def test_placeholder_count_mismatch_is_an_error(tiny_model):
    s = sample(4, [1], 0)
    ids = torch.cat([s["input_ids"], torch.tensor([IMAGE])])[None]
    with pytest.raises(ImageTokenMismatchError, match="<im_patch>"):
        tiny_model(
            input_ids=ids, pixel_values=s["pixel_values"], patch_pixel_values=s["patch_pixel_values"], num_patches=[1]
        )
    with pytest.raises(ImageTokenMismatchError, match="num_patches"):
        tiny_model(
            input_ids=s["input_ids"][None],
            pixel_values=s["pixel_values"],
            patch_pixel_values=s["patch_pixel_values"],
            num_patches=[2],
        )
    with pytest.raises(ImageTokenMismatchError, match="no pixel_values"):
        tiny_model(input_ids=s["input_ids"][None])


def test_loss_is_shifted_cross_entropy_over_labelled_tokens(tiny_model):
    ids = torch.randint(11, 1000, (2, 12))
    labels = ids.clone()
    labels[:, :5] = -100
    out = tiny_model(input_ids=ids, labels=labels)
    logits = tiny_model(input_ids=ids).logits
    expected = F.cross_entropy(logits[:, :-1].reshape(-1, 1024).float(), labels[:, 1:].reshape(-1))
    torch.testing.assert_close(out.loss, expected)
    summed = tiny_model(input_ids=ids, labels=labels, num_items_in_batch=torch.tensor(100)).loss
    torch.testing.assert_close(summed, expected * 14 / 100)


def test_a_training_step_where_no_rank_has_an_image_never_calls_the_vision_tower(tiny_model):
    tiny_model.train()
    calls = []
    tiny_model.vision_model.register_forward_hook(lambda *_: calls.append(1))
    tiny_model(input_ids=torch.randint(11, 1000, (2, 9)), labels=torch.randint(11, 1000, (2, 9))).loss.backward()
    assert not calls
    for name, param in tiny_model.named_parameters():
        unused = name.startswith(("vision_model.", "vit_large_projector"))
        assert (param.grad is None) == unused, name  # DeepSpeed reduces zero gradients for the tower


def test_once_a_rank_needs_the_tower_every_batch_kind_reaches_every_image_weight(tiny_model, monkeypatch):
    """ZeRO-3 reduces gradients in buckets that must hold the same parameters on every rank: once any rank
    needs the tower, a rank holding text alone runs it (and the projector) on one stand-in, and a rank with
    views runs as many calls as its own views need (the weights are kept whole, so calls gather nothing)."""
    runtime = type(tiny_model.runtime)
    monkeypatch.setattr(runtime, "agree", lambda self, counts, device: [1, counts[1]])
    tiny_model.runtime.compute.vision_chunk = 1
    tiny_model.train()
    calls = []
    tiny_model.vision_model.register_forward_hook(lambda _m, args, _o: calls.append(args[0].shape[-1]))
    with_crops, global_only = sample(4, [1], 0), sample(1, [0], 1)
    runs, reached = [], []
    for s in (with_crops, global_only, None):
        calls.clear()
        tiny_model.zero_grad()
        if s is None:
            inputs = {"input_ids": torch.randint(11, 1000, (1, 9))}
        else:
            inputs = {
                "input_ids": s["input_ids"][None],
                "pixel_values": s["pixel_values"],
                "patch_pixel_values": s["patch_pixel_values"],
                "num_patches": s["num_patches"],
            }
        tiny_model(**inputs, labels=inputs["input_ids"]).loss.backward()
        runs.append(list(calls))
        reached.append({name for name, p in tiny_model.named_parameters() if p.grad is not None})
    assert runs == [[224, 168], [224], [56]]  # a global view and a crop; a global view; a stand-in
    assert reached[0] == reached[1] == reached[2] == {name for name, _ in tiny_model.named_parameters()}


def test_training_step_with_images_trains_the_vision_tower(tiny_model):
    tiny_model.train()
    s = sample(4, [1], 0)
    tiny_model(
        input_ids=s["input_ids"][None],
        pixel_values=s["pixel_values"],
        patch_pixel_values=s["patch_pixel_values"],
        num_patches=[1],
        labels=s["input_ids"][None],
    ).loss.backward()
    assert torch.count_nonzero(tiny_model.vision_model.conv1.weight.grad) > 0


def test_greedy_generation_with_kv_cache_matches_recomputation(tiny_model):
    s = sample(6, [1], 4)
    ids = s["input_ids"][None]
    images = {k: s[k] for k in ("pixel_values", "patch_pixel_values", "num_patches")}
    generated = tiny_model.generate(input_ids=ids, **images, max_new_tokens=6, do_sample=False, eos_token_id=None)
    expected = ids
    with torch.no_grad():
        for _ in range(6):
            logits = tiny_model(input_ids=expected, **images, use_cache=False).logits
            expected = torch.cat([expected, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(generated, expected)


def test_fresh_initialisation_follows_pe_and_qwen(tiny_model):
    vision = tiny_model.config.vision_config
    block = tiny_model.vision_model.transformer.resblocks[0]
    assert torch.all(block.ls_1.gamma == vision.ls_init_value) and torch.all(block.ls_2.gamma == vision.ls_init_value)
    assert abs(block.attn.in_proj_weight.std().item() - vision.initializer_range) < 0.005
    assert torch.count_nonzero(block.attn.in_proj_bias) == 0
    assert abs(tiny_model.vision_model.positional_embedding.std().item() - vision.width**-0.5) < 0.02


@pytest.mark.parametrize("mode", ["blocks", "calls"])
def test_a_checkpointed_vision_block_runs_forward_twice_a_call_and_keeps_the_gradients(tiny_model, mode):
    """The forward and one recompute, never three (a checkpointed call whose blocks were checkpointed
    again ran each block a third time), counted by forward pre-hooks; gradients as without checkpointing."""
    s = sample(4, [1], 0)
    inputs = {
        "input_ids": s["input_ids"][None],
        "pixel_values": s["pixel_values"],
        "patch_pixel_values": s["patch_pixel_values"],
        "num_patches": [1],
        "labels": s["input_ids"][None],
    }
    blocks = tiny_model.vision_model.transformer.resblocks
    runs = []
    for block in blocks:
        block.register_forward_pre_hook(lambda *_: runs.append(1))
    tiny_model.train()
    tiny_model(**inputs).loss.backward()
    assert len(runs) == len(blocks) * 2  # two tower calls (the global view, the crop), once each
    plain = {n: p.grad.clone() for n, p in tiny_model.named_parameters()}
    tiny_model.zero_grad()
    runs.clear()
    tiny_model.runtime.compute.vision_checkpoint = mode
    tiny_model.gradient_checkpointing_enable()
    tiny_model(**inputs).loss.backward()
    assert len(runs) == len(blocks) * 2 * 2
    for name, param in tiny_model.named_parameters():
        torch.testing.assert_close(param.grad, plain[name], rtol=1e-5, atol=1e-6, msg=name)
