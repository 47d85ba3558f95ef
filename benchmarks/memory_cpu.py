"""Peak memory on the CPU: the loss over a long row with Qwen3's vocabulary, before and after tiling; RL's
scoring of long responses, before and after; a training step of a narrow, long model against
`step3vl_train/train/memory.py`'s estimate; and a traced Qwen3-8B decoder layer's recompute.

python benchmarks/memory_cpu.py loss [--lengths 2048 4096 8192 32768]
python benchmarks/memory_cpu.py score [--responses 2048 4096 8192 16384] [--prompt 512]
python benchmarks/memory_cpu.py step [--seq-len 4096]
python benchmarks/memory_cpu.py layer [--lengths 4096 16384 131072] [--dtype bfloat16]

Each measurement of loss, score and step runs in a fresh process: the growth of its peak RSS over the
measured region (what was resident before it, the model and the inputs, is subtracted). `loss`: a decoder
of 2 layers x 64 with the 151,936-token vocabulary, fp32, every position labelled; "whole" is the former
path (the head over every position, transformers' ForCausalLMLoss), "tiled" the current one
(compute.loss_chunk positions a head call). The whole path at 32K needs ~60 GB, more than the machine has,
so it runs under an address-space limit and reports where it failed. `score`: RL's log-probs and entropy
of one prompt + response row without gradients (TrainWorker.score), the same decoder in bf16 as on GPUs;
"whole" is the former path (bf16 logits over every position, upcast to fp32, logsumexp, then log_softmax
and a full softmax entropy), "tiled" the current one (the forward with response labels: the head over
response positions only, compute.loss_chunk at a time); where the whole path would pass 8 GiB it runs
under the address-space limit. `step`: forward and backward with activation checkpointing of a 4-layer x
256 decoder, the same vocabulary and a tiny vision tower over a few views, against the estimate's
activation parts for fp32 (`measured_vs_estimate`). `layer`, allocating nothing: one Qwen3-8B decoder layer
(configs/model/step3vl_10b.yaml) traced under fake tensors by torch's MemTracker, as activation
checkpointing recomputes it in backward, with flash attention's O(tokens) memory (trace_decoder_layer):
what its forward keeps and the peak of its backward, bytes a token, beside the counted formula
(decoder_layer_bytes) and the estimate's "decoder layer recompute". Each mode prints a Markdown table.
"""

import argparse
import json
import resource
import subprocess
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
VOCAB = 151936
ADDRESS_LIMIT = 16 * 2**30


def rss() -> int:
    return int(Path("/proc/self/statm").read_text().split()[1]) * resource.getpagesize()


def peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def narrow_config(hidden: int, layers: int, intermediate: int):
    from omegaconf import OmegaConf

    from step3vl_train.model import Step3VLConfig

    values = OmegaConf.to_container(OmegaConf.load(REPO / "configs/model/tiny.yaml"))
    heads = max(hidden // 64, 2)
    values["text_config"] |= {
        "vocab_size": VOCAB,
        "hidden_size": hidden,
        "intermediate_size": intermediate,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": heads // 2,
        "head_dim": 64,
        "max_position_embeddings": 65536,
        "max_window_layers": layers,
    }
    return Step3VLConfig.from_dict(values)


def loss_region(path: str, length: int, chunk: int) -> dict:
    """One process: the model, the row, then the measured forward and backward of the loss alone."""
    import torch
    from transformers.loss.loss_utils import ForCausalLMLoss

    from step3vl_train.model import Step3VLForConditionalGeneration

    torch.manual_seed(0)
    model = Step3VLForConditionalGeneration(narrow_config(64, 2, 128))
    model.runtime.compute.loss_chunk = chunk
    ids = torch.randint(11, VOCAB, (1, length))
    with torch.no_grad():
        hidden = model.model(input_ids=ids).last_hidden_state
    hidden.requires_grad_()
    before = rss()
    try:
        if path == "whole":
            loss = ForCausalLMLoss(model.lm_head(hidden), ids, vocab_size=VOCAB)
        else:
            from step3vl_train.model.token_scores import chunk_count, token_scores

            targets = ids[0, 1:]
            logprobs, _ = token_scores(model.lm_head, hidden[0, :-1], targets, chunk_count(length - 1, chunk))
            loss = -logprobs.mean()
        loss.backward()
    except RuntimeError as error:  # the address-space limit: an allocation refused
        return {"failed": str(error).splitlines()[0][:120], "peak_gib": (peak_rss() - before) / 2**30}
    return {"peak_gib": (peak_rss() - before) / 2**30, "loss": float(loss)}


def score_region(path: str, response: int, prompt: int, chunk: int) -> dict:
    """One process: the bf16 model and a prompt + response row, then the measured scoring of the response
    (log-probs at temperature 1 and entropy, no gradients)."""
    import torch

    from rl.experience import sequence_batch
    from step3vl_train.model import Step3VLForConditionalGeneration
    from step3vl_train.processing.processor import ProcessedSample

    torch.manual_seed(0)
    model = Step3VLForConditionalGeneration(narrow_config(64, 2, 128)).to(torch.bfloat16).eval()
    model.runtime.compute.loss_chunk = chunk
    prompt_ids = torch.randint(11, VOCAB, (prompt,))
    sample = ProcessedSample(prompt_ids, prompt_ids.clone(), None, [], torch.zeros(0, dtype=torch.bool))
    sequences = sequence_batch([(sample, torch.randint(11, VOCAB, (response,)).tolist())], 0)
    inputs = sequences.batch.model_inputs(with_labels=False)
    before = rss()
    try:
        with torch.no_grad():
            if path == "whole":  # as rl/algos/logprobs.py did before the head was tiled
                logits = model(**inputs).logits[:, :-1]
                targets = sequences.batch.input_ids[:, 1:]
                scaled = logits.float() / 1.0
                logprobs = scaled.gather(-1, targets[..., None]).squeeze(-1) - torch.logsumexp(scaled, dim=-1)
                del scaled
                log_p = torch.log_softmax(logits.float() / 1.0, dim=-1)
                entropy = -(log_p.exp() * log_p).sum(-1)
            else:  # TrainWorker._scores
                out = model(**inputs, labels=sequences.response_labels(), logprobs_temperature=1.0, return_entropy=True)
                logprobs, entropy = out.logprobs[:, :-1], out.entropy[:, :-1]
    except RuntimeError as error:  # the address-space limit: an allocation refused
        return {"failed": str(error).splitlines()[0][:120], "peak_gib": (peak_rss() - before) / 2**30}
    mask = sequences.response_mask.bool()
    return {
        "peak_gib": (peak_rss() - before) / 2**30,
        "logprob_sum": float(logprobs[mask].sum()),
        "entropy_sum": float(entropy[mask].sum()),
    }


def step_region(seq_len: int, chunk: int, vision_chunk: int) -> dict:
    """One process: a checkpointed forward and backward of a packed row with images; the estimate of the
    same row's activations in fp32 beside it."""
    import torch

    from step3vl_train.model import Step3VLForConditionalGeneration
    from step3vl_train.train.memory import TrainingShape, decoder_parts, peak_bytes, vision_parts

    torch.manual_seed(0)
    config = narrow_config(256, 4, 768)
    model = Step3VLForConditionalGeneration(config).train()
    model.gradient_checkpointing_enable()
    model.runtime.compute.loss_chunk, model.runtime.compute.vision_chunk = chunk, vision_chunk
    views, crops_per_image = 4, 3  # tiny views: 224 global, 168 crops (configs/processor/tiny.yaml)
    image_tokens = views * (crops_per_image * 9 + 16)
    ids = torch.randint(11, VOCAB, (1, seq_len))
    ids[0, 100 : 100 + image_tokens] = config.image_token_id
    inputs = {
        "input_ids": ids,
        "position_ids": torch.arange(seq_len)[None],
        "pixel_values": torch.randn(views, 3, 224, 224),
        "patch_pixel_values": torch.randn(views * crops_per_image, 3, 168, 168),
        "num_patches": [crops_per_image] * views,
        "labels": ids,
    }
    for param in model.parameters():  # gradients exist before the region, as after a first step
        param.grad = torch.zeros_like(param)
    before = rss()
    model(**inputs).loss.backward()
    measured = peak_rss() - before
    shape = TrainingShape(
        seq_len=seq_len, bytes_per_param=4, vision_chunk=vision_chunk, loss_chunk=chunk, attention="sdpa",
        max_views_per_pack=views * crops_per_image, max_images_per_pack=views, image_size=224, crop_size=168,
    )  # fmt: skip
    parts = decoder_parts(config, shape) + vision_parts(config, shape)
    return {
        "measured_gib": measured / 2**30,
        "estimate_gib": peak_bytes(parts) / 2**30,
        "parts": {p.name + (" *" if p.transient else ""): p.bytes for p in parts},
    }


TRACE_ATTENTION = "flash_trace"  # the transformers attention function trace_decoder_layer registers
LAYER_MODEL = "configs/model/step3vl_10b.yaml"  # its text_config: Qwen3-8B's shapes


def layer_config():
    """The Step3VLConfig of LAYER_MODEL."""
    from omegaconf import OmegaConf

    from step3vl_train.model import Step3VLConfig

    return Step3VLConfig.from_dict(OmegaConf.to_container(OmegaConf.load(REPO / LAYER_MODEL)))


def flash_trace_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """A transformers attention function with flash-attention's memory that runs on the CPU and under fake
    tensors: query (B, heads, L, D), key and value (B, kv_heads, L, D) -> (B, L, heads, D), causal.

    As transformers' flash_attention_2 path, it hands the kernel q, k and v as (B, L, heads, D), contiguous
    (a no-op for Qwen3: rope's outputs keep the projections' layout), and returns the output in that layout
    (o_proj's input without a copy). The CPU flash kernel keeps for backward what flash-attn keeps: q, k
    and v (k and v with kv_heads, not repeated), the output and an fp32 log-sum-exp a head and token; torch's
    meta kernel allocates just the output and the log-sum-exp, so no (L x L) tensor exists. Causal over the
    whole row (one sample); flash-attn's varlen path over packed samples keeps the same tensors. Its backward
    makes dq, dk and dv; flash-attn 2's also makes an fp32 dq accumulator and, with GQA, dk and dv over all
    heads, 4 q + 2 b q bytes a token more at that moment, which stays below the layer's peak (in the MLP)."""
    if attention_mask is not None:
        raise ValueError("flash_trace takes no mask: a causal row, as flash-attention's varlen path")
    q, k, v = (t.transpose(1, 2).contiguous() for t in (query, key, value))
    out, _ = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), dropout, True, scale=scaling
    )
    return out.transpose(1, 2), None


def layer_tracker():
    """A MemTracker that also records, op by op, which storages are alive, so that parameters and their
    gradients can be left out of a peak afterwards: MemTracker files a weight's gradient under Temp when
    the op makes it, and under Gradient only once the parameter's hook has run."""
    from torch.distributed._tools.common_utils import get_untyped_storages
    from torch.distributed._tools.mem_tracker import MemTracker

    class LayerTracker(MemTracker):
        def __init__(self) -> None:
            super().__init__()
            self.phase, self.func, self.steps, self.infos = "forward", None, [], {}

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.func = func
            return super().__torch_dispatch__(func, types, args, kwargs)

        def _update_peak_stats(self, peak_state) -> None:  # after every op
            super()._update_peak_stats(peak_state)
            alive = [info for info, _ in self._WINFO.values()]
            self.infos.update((id(info), info) for info in alive)  # held: ids stay unique
            where = f"{self.func} in {max(self._mod_tracker.parents, key=len)}"  # the innermost module
            self.steps.append((self.phase, where, {id(info) for info in alive}))

        def alive(self) -> set[int]:
            return {id(info) for info, _ in self._WINFO.values()}

        def ids_of(self, *tensors) -> set[int]:
            storages = set().union(*(get_untyped_storages(t) for t in tensors))
            return {id(self._WINFO[st][0]) for st in storages if st in self._WINFO}

        def alive_bytes(self, ids, kinds) -> int:  # by the kind each storage ended with
            return sum(self.infos[i].mem_consumed for i in ids if self.infos[i].reftype in kinds)

    return LayerTracker()


def trace_decoder_layer(tokens: int, dtype=torch.bfloat16) -> dict:
    """One Qwen3-8B decoder layer (LAYER_MODEL's text_config) over one row of `tokens` tokens, traced under
    fake tensors (no memory used: 128K tokens take a second) as activation checkpointing recomputes it in
    backward: forward with gradient on the layer's input, then backward with an upstream gradient of the
    output's shape, MemTracker counting the storages. The rotary cos and sin are the model's for position
    ids 0..tokens-1, passed with them as Qwen3Model does; attention is flash_trace_attention, O(tokens).

    Bytes a token:
    kept: what the forward leaves for backward (MemTracker's Activation once the forward has returned).
    peak: the most alive at once during backward: the saved tensors not yet released (Activation), the
      gradients of activations as they are made, the input's included (Temp), and the upstream gradient
      (Other). The same figure as when torch.utils.checkpoint(use_reentrant=False) recomputes the layer.
    upstream: the upstream gradient's share of peak (hidden elements); subtract it for the layer's own.
    Neither counts the parameters, buffers or parameter gradients, the layer's input (the checkpoint), the
    cos/sin tables (the model's, shared by the layers) nor the layer's output (a checkpoint's recompute
    stops before making it). peak_op: the op at the peak; peak_parts: the peak by MemTracker's kinds."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.distributed._tools.mem_tracker import _MemRefType as Kind
    from transformers import AttentionInterface
    from transformers.models.qwen3.modeling_qwen3 import Qwen3DecoderLayer, Qwen3RotaryEmbedding

    config = layer_config().text_config
    AttentionInterface.register(TRACE_ATTENTION, flash_trace_attention)
    config._attn_implementation = TRACE_ATTENTION
    default = torch.get_default_dtype()
    with FakeTensorMode():
        torch.set_default_dtype(dtype)  # parameters made in `dtype`: .to() cannot swap fake parameters
        try:
            layer = Qwen3DecoderLayer(config, layer_idx=0).train()
        finally:
            torch.set_default_dtype(default)
        hidden = torch.randn(1, tokens, config.hidden_size, dtype=dtype, requires_grad=True)
        position_ids = torch.arange(tokens)[None]
        cos_sin = Qwen3RotaryEmbedding(config)(hidden, position_ids)
        upstream = torch.randn(1, tokens, config.hidden_size, dtype=dtype)
        tracker = layer_tracker()
        tracker.track_external(layer, upstream)
        with tracker:
            out = layer(hidden, position_ids=position_ids, position_embeddings=cos_sin)
            after_forward = tracker.alive()
            tracker.phase = "backward"
            out.backward(upstream)
        given = tracker.ids_of(hidden, *cos_sin, out)  # tracked through views of them; left out
    del out
    counted = tuple(kind for kind in Kind if kind not in (Kind.PARAM, Kind.BUFFER, Kind.GRAD))
    kept = tracker.alive_bytes(after_forward - given, (Kind.ACT,))
    steps = [(op, ids - given) for phase, op, ids in tracker.steps if phase == "backward"]
    peak, peak_op, peak_ids = max(
        ((tracker.alive_bytes(ids, counted), op, ids) for op, ids in steps), key=lambda s: s[0]
    )
    return {
        "tokens": tokens,
        "dtype": str(dtype).removeprefix("torch."),
        "kept": kept / tokens,
        "peak": peak / tokens,
        "upstream": upstream.nbytes / tokens,
        "peak_op": peak_op,
        "peak_parts": {kind.value: tracker.alive_bytes(peak_ids, (kind,)) / tokens for kind in counted},
    }


def in_subprocess(function: str, *args, limit: int | None = None) -> dict:
    code = f"import json, benchmarks.memory_cpu as m; print(json.dumps(m.{function}(*{args!r})))"
    preexec = (lambda: resource.setrlimit(resource.RLIMIT_AS, (limit, limit))) if limit else None
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, preexec_fn=preexec, timeout=1800
    )
    if done.returncode != 0:
        return {"failed": done.stderr.strip().splitlines()[-1][:120]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def loss(args) -> None:
    print("| length | whole logits (former) | tiled, 2,048 a call |\n|---|---|---|")
    for length in args.lengths:
        limit = ADDRESS_LIMIT if length > 8192 else None
        whole, tiled = in_subprocess("loss_region", "whole", length, 2048, limit=limit), None
        tiled = in_subprocess("loss_region", "tiled", length, 2048)
        show = [
            f"failed at {r['peak_gib']:.2f} GiB (limit {ADDRESS_LIMIT / 2**30:.0f} GiB of address space)"
            if "failed" in r and "peak_gib" in r
            else r.get("failed") or f"{r['peak_gib']:.2f} GiB"
            for r in (whole, tiled)
        ]
        print(f"| {length:,} | {show[0]} | {show[1]} |")


def score(args) -> None:
    print(f"{args.prompt}-token prompt + a response, 1 row, vocabulary {VOCAB:,}, bf16; peak RSS growth")
    print(
        f"| response tokens | whole logits (former) | bytes a logit | tiled, {args.loss_chunk:,} a call | "
        "tiled bytes a tile logit |\n|---|---|---|---|---|"
    )
    for response in args.responses:
        logits = (args.prompt + response - 1) * VOCAB  # (L - 1) x V: every position but the last
        limit = ADDRESS_LIMIT if 14 * logits > ADDRESS_LIMIT // 2 else None
        whole = in_subprocess("score_region", "whole", response, args.prompt, args.loss_chunk, limit=limit)
        tiled = in_subprocess("score_region", "tiled", response, args.prompt, args.loss_chunk)
        if "failed" in whole:
            shown, per_logit = f"failed at {whole.get('peak_gib', 0):.2f} GiB (limit {ADDRESS_LIMIT / 2**30:.0f})", "-"
        else:
            shown, per_logit = f"{whole['peak_gib']:.2f} GiB", f"{whole['peak_gib'] * 2**30 / logits:.1f}"
            assert abs(whole["logprob_sum"] - tiled["logprob_sum"]) < 1e-3 * abs(tiled["logprob_sum"]), (whole, tiled)
        tile = min(args.loss_chunk, response) * VOCAB
        print(f"| {response:,} | {shown} | {per_logit} | {tiled['peak_gib']:.2f} GiB | "
              f"{tiled['peak_gib'] * 2**30 / tile:.1f} |")  # fmt: skip


def step(args) -> None:
    result = in_subprocess("step_region", args.seq_len, args.loss_chunk, args.vision_chunk)
    print("| part | estimate GiB |\n|---|---|")
    for name, value in result["parts"].items():
        print(f"| {name} | {value / 2**30:.3f} |")
    ratio = result["measured_gib"] / result["estimate_gib"]
    total = f"**{result['estimate_gib']:.3f}** (measured {result['measured_gib']:.3f}: {ratio:.2f} of it)"
    print(f"| total (kept + the largest transient *) | {total} |")


def layer(args) -> None:
    from step3vl_train.train.memory import LAYER_KEPT, LAYER_PEAK, TrainingShape, decoder_layer_bytes, decoder_parts

    dtype = getattr(torch, args.dtype)
    b = torch.finfo(dtype).bits // 8
    config = layer_config()
    kept, peak = decoder_layer_bytes(config.text_config, b)
    print(f"One Qwen3-8B decoder layer recomputed in backward, {args.dtype}, flash attention; bytes a token")
    print(f"kept = {LAYER_KEPT}\npeak = {LAYER_PEAK}  (the last hidden: the upstream gradient)")
    print(
        "| tokens | kept after forward | formula | peak in backward | formula | of it, upstream grad | "
        "memory.py's recompute estimate | peak at |\n|---|---|---|---|---|---|---|---|"
    )
    for tokens in args.lengths:
        trace = trace_decoder_layer(tokens, dtype)
        shape = TrainingShape(seq_len=tokens, bytes_per_param=b)
        estimate = next(p.bytes for p in decoder_parts(config, shape) if p.name == "decoder layer recompute")
        print(
            f"| {tokens:,} | {trace['kept']:,.0f} | {kept:,.0f} | {trace['peak']:,.0f} | "
            f"{peak:,.0f} | {trace['upstream']:,.0f} | {estimate / tokens:,.0f} | {trace['peak_op']} |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="mode", required=True)
    loss_parser = sub.add_parser("loss")
    loss_parser.add_argument("--lengths", type=int, nargs="+", default=[2048, 4096, 8192, 32768])
    score_parser = sub.add_parser("score")
    score_parser.add_argument("--responses", type=int, nargs="+", default=[2048, 4096, 8192, 16384])
    score_parser.add_argument("--prompt", type=int, default=512)
    score_parser.add_argument("--loss-chunk", type=int, default=2048)
    step_parser = sub.add_parser("step")
    step_parser.add_argument("--seq-len", type=int, default=4096)
    step_parser.add_argument("--loss-chunk", type=int, default=512)
    step_parser.add_argument("--vision-chunk", type=int, default=2)
    layer_parser = sub.add_parser("layer")
    layer_parser.add_argument("--lengths", type=int, nargs="+", default=[4096, 16384, 131072])
    layer_parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    args = parser.parse_args()
    {"loss": loss, "score": score, "step": step, "layer": layer}[args.mode](args)


if __name__ == "__main__":
    main()
