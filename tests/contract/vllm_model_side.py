"""vLLM 0.33's own STEP3-VL model (`vllm/model_executor/models/step_vl.py`) against ours, on the CPU.

Run as vllm_side.py is, in the contract environment. Both models hold the same tiny weights (an export read
back: ours through `from_pretrained`, vLLM's through its weight mapper, then its loader's
`process_weights_after_loading`). Letter (i): they compute the same image features and the same logits.

What runs as vLLM's own code. The model is built eager (compilation mode NONE) with vLLM's own setting
`custom_ops=["none"]`, which sends every CustomOp (RMSNorm, rotary embedding, SiluAndMul, QuickGELU) to its
`forward_native`; linear layers fall back to `torch.nn.functional.linear` (vLLM's CPU GEMM dispatch finds
no compiled kernel); the vision encoder's MMEncoderAttention picks its TORCH_SDPA backend. So the vision
tower, the projector and the image-feature merge are vLLM's code end to end, and so is the decoder but for
its attention kernel.

What cannot run: the decoder's attention kernels, which are compiled ops of vLLM's CPU build (`vllm._C`); the
PyPI wheel is the CUDA build and has no `vllm._C` ("Failed to import from vllm._C" at import). On the CPU
platform the decoder's `Attention` always takes the CPU_ATTN backend (platforms/cpu.py:188 logs "Cannot use
... backend on CPU" for any other asked for), which stops at, in call order:
  - v1/attention/backends/cpu_attn.py:262, CPUAttentionMetadataBuilder.build -> _custom_ops.py:4050
    `torch.ops._C.get_scheduler_metadata`: AttributeError: '_OpNamespace' '_C' object has no attribute
    'get_scheduler_metadata';
  - cpu_attn.py:486, CPUAttentionBackendImpl.do_kv_cache_update -> _custom_ops.py:4079
    `torch.ops._C.cpu_attn_reshape_and_cache` (the same AttributeError), reached through
    model_executor/layers/attention/attention.py:573 `torch.ops.vllm.unified_kv_cache_update`;
  - cpu_attn.py:449, CPUAttentionBackendImpl.forward -> _custom_ops.py:4112
    `torch.ops._C.cpu_attention_with_kv_cache` (the same AttributeError), reached through attention.py:576
    `torch.ops.vllm.unified_attention_with_output`.
(With vLLM's default `custom_ops` the decoder stops earlier, at rotary_embedding/base.py:310
RotaryEmbedding.forward_cpu -> _custom_ops.py:223 `torch.ops._C.rotary_embedding`; and without
`enforce_eager` vLLM compiles the model with inductor, into ~/.cache/vllm.)
The logits tests stand in for those three ops only (`attention_stand_ins`): the paged KV cache written and
read by slot as vLLM lays it out, and causal SDPA over it. Everything around them is vLLM's: the fused QKV,
q/k norms, rotary embedding, MLP, embedding and head, the attention layer's plumbing and the CPU backend's
metadata. What these tests cannot catch is a difference inside vLLM's compiled attention kernel itself.
"""

from pathlib import Path

import pytest
import torch
from PIL import Image

from step3vl_train.model import Step3VLForConditionalGeneration
from step3vl_train.model.checkpoint import read_released_tensors
from step3vl_train.processing.processor import collate
from tests.contract import vllm_side

REPO = Path(__file__).resolve().parents[2]


export = vllm_side.export  # the tiny export, as launch/export_hf.py writes it
quick_gelu_schema = vllm_side.quick_gelu_schema


@pytest.fixture(scope="module")
def vllm_model(export, quick_gelu_schema):
    """(vLLM's StepVLForConditionalGeneration with the export's weights, its VllmConfig)."""
    from vllm.config import (
        CompilationConfig,
        DeviceConfig,
        LoadConfig,
        ModelConfig,
        VllmConfig,
        set_current_vllm_config,
    )
    from vllm.config.compilation import CompilationMode
    from vllm.model_executor.model_loader.utils import process_weights_after_loading
    from vllm.model_executor.models.step_vl import StepVLForConditionalGeneration

    model_config = ModelConfig(
        model=str(export), tokenizer=str(export), trust_remote_code=True, dtype="float32", enforce_eager=True
    )
    config = VllmConfig(
        model_config=model_config,
        device_config=DeviceConfig("cpu"),
        load_config=LoadConfig(),
        compilation_config=CompilationConfig(mode=CompilationMode.NONE, custom_ops=["none"]),
    )
    with set_current_vllm_config(config):
        vllm_side.one_rank_model_parallel()
        model = StepVLForConditionalGeneration(vllm_config=config)
        model.load_weights(read_released_tensors(export).items())
        process_weights_after_loading(model, model_config, torch.device("cpu"))  # as vLLM's loader does
    return model.eval(), config


@pytest.fixture(scope="module")
def ours(export):
    return Step3VLForConditionalGeneration.from_pretrained(export).eval()


@pytest.fixture(scope="module")
def attention_stand_ins():
    """The three compiled ops of vLLM's CPU attention backend the CUDA wheel lacks (module docstring), as
    plain torch over the backend's own cache layout: (blocks, kv heads, block size, head size) halves."""
    import vllm._custom_ops as ops

    # Called with keywords, vLLM's names (_custom_ops.py); the ones not named here are unused or default.
    def reshape_and_cache(key, value, key_cache, value_cache, slot_mapping, *_, **__):
        block, offset = slot_mapping // key_cache.shape[2], slot_mapping % key_cache.shape[2]
        key_cache[block, :, offset] = key
        value_cache[block, :, offset] = value

    def attention(
        query, key_cache, value_cache, output, query_start_loc, seq_lens, scale, causal, block_table, **unused
    ):
        assert unused["alibi_slopes"] is None and unused["s_aux"] is None and not unused["softcap"]
        assert unused["sliding_window"] == -1 and unused["dynamic_causal"] is None  # none of them stood in for
        block_size, kv_heads, head_size = key_cache.shape[2], key_cache.shape[1], key_cache.shape[3]
        for request, length in enumerate(seq_lens.tolist()):
            start, stop = query_start_loc[request : request + 2].tolist()
            blocks = block_table[request, : -(-length // block_size)]

            def cached(cache, blocks=blocks, length=length):
                return cache[blocks].transpose(1, 2).reshape(-1, kv_heads, head_size)[:length].transpose(0, 1)

            q = query[start:stop].transpose(0, 1)
            mask = torch.ones(stop - start, length, dtype=torch.bool).tril(length - (stop - start))
            attended = torch.nn.functional.scaled_dot_product_attention(
                q, cached(key_cache), cached(value_cache), attn_mask=mask if causal else None, scale=scale,
                enable_gqa=True,
            )  # fmt: skip
            output[start:stop] = attended.transpose(0, 1).reshape(output[start:stop].shape)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(ops, "cpu_attn_get_scheduler_metadata", lambda **_: torch.empty(0))
        patch.setattr(ops, "cpu_attn_reshape_and_cache", reshape_and_cache)
        patch.setattr(ops, "cpu_attention_with_kv_cache", attention)
        yield


def vllm_logits(model, config, input_ids: torch.Tensor, inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:
    """vLLM's logits (L, vocab) for one request's prefill of `input_ids` (L,), as its model runner calls
    the model: attention metadata from the CPU backend's builder, a KV cache a layer, the forward context."""
    from vllm.forward_context import set_forward_context
    from vllm.model_executor.layers.attention import Attention
    from vllm.v1.attention.backend import CommonAttentionMetadata
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionMetadataBuilder

    n = len(input_ids)
    layers = {
        name: layer for name, layer in config.compilation_config.static_forward_context.items()
        if isinstance(layer, Attention)
    }  # fmt: skip
    spec = next(iter(layers.values())).get_kv_cache_spec(config)
    blocks = -(-n // spec.block_size)
    for layer in layers.values():
        layer.kv_cache = torch.zeros(blocks, layer.num_kv_heads, spec.block_size, 2 * layer.head_size)
    starts = torch.tensor([0, n], dtype=torch.int32)
    common = CommonAttentionMetadata(
        query_start_loc=starts,
        query_start_loc_cpu=starts,
        seq_lens=torch.tensor([n], dtype=torch.int32),
        num_reqs=1,
        num_actual_tokens=n,
        max_query_len=n,
        max_seq_len=n,
        block_table_tensor=torch.arange(blocks, dtype=torch.int32)[None],
        slot_mapping=torch.arange(n),
        positions=torch.arange(n),
    )
    metadata = CPUAttentionMetadataBuilder(spec, list(layers), config, torch.device("cpu")).build(0, common)
    with (
        torch.no_grad(),
        set_forward_context(
            dict.fromkeys(layers, metadata), config, num_tokens=n, slot_mapping=dict.fromkeys(layers, torch.arange(n))
        ),
    ):
        hidden = model(input_ids if inputs_embeds is None else None, torch.arange(n), inputs_embeds=inputs_embeds)
    return model.compute_logits(hidden)


@pytest.fixture(scope="module")
def photo_batch(tiny_processor):
    """Two photos through our tiny processor (224 global views, 168 crops: the tiny tower's sizes), the first
    with 6 crops, the second with none: (ids (L,), model inputs)."""
    photo = Image.open(REPO / "data" / "samples" / "chelsea.png").convert("RGB")
    images = [photo.resize((400, 300)), photo.resize((200, 150))]
    content = [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "Which cat is larger?"}]
    sample = tiny_processor([{"role": "user", "content": content}], images, add_generation_prompt=True)
    assert sample.num_patches == [6, 0]
    return sample.input_ids, collate([sample], pad_token_id=0).model_inputs(with_labels=False)


def vllm_image_embeddings(model, inputs: dict) -> list[torch.Tensor]:
    with torch.no_grad():
        return model.embed_multimodal(
            pixel_values=inputs["pixel_values"],
            patch_pixel_values=inputs["patch_pixel_values"],
            num_patches=torch.tensor(inputs["num_patches"]),
        )


def test_i_vision_features_match_ours(vllm_model, ours, photo_batch):
    """vLLM's vision tower, projector and merge (each image's crops, then its global view) give our image
    tokens, image by image."""
    model, _ = vllm_model
    _, inputs = photo_batch
    theirs = vllm_image_embeddings(model, inputs)
    assert [len(tokens) for tokens in theirs] == [6 * 9 + 16, 16]
    with torch.no_grad():
        mine, _ = ours.image_embeddings(inputs["pixel_values"], inputs["patch_pixel_values"], inputs["num_patches"])
    assert torch.allclose(torch.cat(theirs), mine, atol=1e-5, rtol=1e-4)


def test_i_text_logits_match_ours(vllm_model, ours, tiny_processor, attention_stand_ins):
    model, config = vllm_model
    messages = [{"role": "user", "content": [{"type": "text", "text": "What is two plus two?"}]}]
    ids = tiny_processor(messages, add_generation_prompt=True).input_ids
    with torch.no_grad():
        mine = ours(input_ids=ids[None]).logits[0]
    assert torch.allclose(vllm_logits(model, config, ids), mine, atol=1e-5, rtol=1e-4)


def test_i_image_prompt_logits_match_ours(vllm_model, ours, photo_batch, attention_stand_ins):
    """A two-image prompt as vLLM's model runner feeds it: the images' tokens written over the `<im_patch>`
    positions (what vLLM's processor marks as embeddings, PromptUpdateDetails.select_token_id)."""
    model, config = vllm_model
    ids, inputs = photo_batch
    with torch.no_grad():
        embeds = model.embed_input_ids(
            ids,
            vllm_image_embeddings(model, inputs),
            is_multimodal=ids == model.config.image_token_id,
        )
        mine = ours(**inputs).logits[0]
    assert torch.allclose(vllm_logits(model, config, ids, embeds), mine, atol=1e-5, rtol=1e-4)
