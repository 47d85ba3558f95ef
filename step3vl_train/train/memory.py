"""What a training rank holds, part by part: an estimate to check by hand and against measured peaks.

Every figure is bytes per rank, from the model's shapes, the run's lengths and these rules:
- ZeRO-3 over all `world` ranks: parameters in the training dtype, fp32 master copies, Adam's two fp32
  moments and fp32 gradient partitions (configs/deepspeed/zero3.yaml accumulates in fp32), each 1/world;
  frozen parameters keep only their working copy. The vision tower, the projector and the head are kept
  whole on every rank besides (train/engine.py: keep_whole), and gathered again after each update.
  Transient: the gathered parameters (`stage3_max_live_parameters`, at least the largest partitioned
  module) and one module's full gradient in the training dtype plus its fp32 copy for the reduce (the
  largest is lm_head), plus a reduce bucket.
- The decoder over T = micro_batch x seq_len / sequence_parallel tokens. With activation checkpointing it
  keeps each layer's input (layers x T x hidden) and, while one layer is recomputed in backward, that
  layer's saved tensors and the gradients alive at its backward's peak (`decoder_layer_bytes`: a Qwen3-8B
  layer traced under fake tensors, benchmarks/memory_cpu.py layer, gives the same to the byte). Without
  checkpointing, every layer's saved tensors.
- The head: `compute.loss_chunk` positions at a time, vocabulary-wide: logits in the training dtype, an
  fp32 copy and an fp32 exp temporary (10 bytes a logit in bf16), and the tile's gradient of the head's
  weight before it is added to the accumulated one; plus the hidden states of the scored positions, their
  gradient, the embeddings and the last hidden states, kept.
- The vision tower, `compute.vision_chunk` views a call, over the views of this rank's slice of the row
  (a sequence-parallel rank receives only those: train/sequence_parallel.py, two more where a view
  straddles each end of the slice). The worst case is the views cap filled with crops, or the image cap
  with global views, as the slice's tokens allow. Pixels in the training dtype; every call's output
  tokens and their gradient. Checkpointed by blocks (`compute.vision_checkpoint: blocks`): each block's
  input of every call is kept, and one block of one call is recomputed at a time (VIT_SAVED); by calls:
  one call's every block is recomputed at a time, and only the tokens are kept.
- Attention: flash and flex keep O(T) (in the layer's tensors); sdpa with a mask, the CPU's kernel, keeps
  a (B, L, L) bool mask; flex_packed (RL's shared prompts) a block mask over the whole rows, four int32
  (L/128 x L/128) tables a row. Ulysses adds its all-to-all buffers (q, k, v in both layouts).
- Transient parts (*) happen at different moments of a step (the head's tile at the start of backward,
  a decoder layer's recompute, a vision call's recompute, the gather after the update): only the largest
  counts towards the total.
- Fixed: CUDA context and NCCL buffers, and a fragmentation margin on everything else.
Host memory (not the GPU's): the rank whose loader reads (a sequence-parallel group's first) holds packs
in shared memory as uint8, about HOST_BYTES_PER_VIEW a view, for its workers' prefetch plus the pinned
batch in flight.

A vLLM rollout engine takes `gpu_memory_utilization` of each of its GPUs: the bf16 weights split over
tensor parallelism, then the KV cache (2 x layers x KV heads x head_dim bf16 values a token, split the same
way) in what is left, less the activations of its profiling forward (not estimated here). Colocated, the
training rank's ZeRO-3 states stay on the GPU while the engine is awake (the working set is freed), so
both must fit together.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from step3vl_train.model.config import Step3VLConfig
from step3vl_train.model.counting import build_on_meta

GIB = 2**30
# One decoder layer's bytes a token (b: bytes an element of the training dtype; q = heads x head_dim,
# kv = kv_heads x head_dim): what its forward keeps for backward, and the peak of its backward, the
# upstream gradient (b x hidden) included. `decoder_layer_bytes` counts them tensor by tensor.
LAYER_KEPT = (
    "4 * (hidden * (b < 4) + hidden + q + kv) + b * (4 * hidden + 3 * q + 3 * kv + 4 * intermediate)"
    " + 4 * (2 + 2 * heads + kv_heads)"
)
LAYER_PEAK = "kept + b * (2 * intermediate + hidden)"
# A ViT block's, per patch: LayerNorms (2 x w), qkv (3 x w), rotated q, k (2 x w), attention output and
# out_proj input (2 x w), c_fc output, quick_gelu's input and sigmoid, c_proj input (4 x mlp).
VIT_SAVED = "9 * width + 4 * mlp"
CUDA_CONTEXT_GIB = 1.5  # CUDA context, cuBLAS workspaces and NCCL buffers
FRAGMENTATION = 0.10  # the caching allocator's slack, on top of everything else
FLEX_BLOCK = 128  # flex attention's block size, each side
HOST_BYTES_PER_VIEW = 2 * 3 * 504 * 504  # a uint8 504 crop window plus as much again of its image's source


def decoder_layer_bytes(text_config, b: int) -> tuple[float, float]:
    """(LAYER_KEPT, LAYER_PEAK) for a Qwen3 text config and `b` bytes an element (2: bf16, 4: fp32), bytes
    a token, counted tensor by tensor; benchmarks/memory_cpu.py `trace_decoder_layer` measures the same.

    Kept for backward (the layer's input and output, the rotary cos/sin and the weights not counted):
    - each RMSNorm (input_layernorm, post_attention_layernorm) upcasts to fp32: its fp32 input (saved by pow
      and by the multiply with rsqrt; for input_layernorm in fp32 training that is the input itself:
      `b < 4`), rsqrt (fp32, one a token), the normalised values cast back (b, saved by the weight's
      multiply) and its output (b, the next linears' input): 4 * 2 hidden + b * 4 hidden + 4 * 2
    - q_norm and k_norm, the same over head_dim: fp32 copies of the q and k projections, their normalised
      values (b) and rsqrt a head; their outputs are not kept (rope multiplies by cos and sin, which need
      no gradient): 4 (q + kv) + b (q + kv) + 4 (heads + kv_heads)
    - attention (flash): rope's q and k, v_proj's output, the output (o_proj's input too) and the fp32
      log-sum-exp: b (2 q + 2 kv) + 4 heads
    - the MLP: gate_proj's output (SiLU's input), SiLU's output, up_proj's output, their product
      (down_proj's input): b * 4 intermediate
    Peak in backward: in the MLP product's backward, once both its input gradients exist. down_proj has
    released the product; its gradient, SiLU output's and up_proj output's are alive, plus the upstream
    gradient: kept + b * (2 intermediate + hidden). With Qwen3-8B's shapes every other moment is lower."""
    hidden, inter = text_config.hidden_size, text_config.intermediate_size
    heads, kv_heads = text_config.num_attention_heads, text_config.num_key_value_heads
    q, kv = heads * text_config.head_dim, kv_heads * text_config.head_dim
    kept = 4 * (hidden * (b < 4) + hidden + q + kv) + b * (4 * hidden + 3 * q + 3 * kv + 4 * inter)
    kept += 4 * (2 + 2 * heads + kv_heads)
    return kept, kept + b * (2 * inter + hidden)


@dataclass
class ClusterConfig:
    """configs/estimate_memory.yaml `cluster:`: the GPUs a run is sized for."""

    gpus: int = 8  # ranks (all nodes)
    gpu_memory_gb: float = 80.0  # GiB a GPU
    cpus_per_gpu: int = 16  # CPU cores a rank has: what data.num_workers=auto makes of them


@dataclass
class TrainingShape:
    """The lengths and settings that decide a rank's memory."""

    seq_len: int
    micro_batch: int = 1
    world: int = 8
    sequence_parallel: int = 1
    checkpointing: bool = True
    bytes_per_param: int = 2  # bf16; 4 for fp32
    vision_chunk: int = 8
    vision_checkpoint: str = "blocks"
    loss_chunk: int = 2048
    attention: str = "flash_attention_2"
    max_views_per_pack: int = 256
    max_images_per_pack: int = 64
    frozen: tuple[str, ...] = ()  # parameter name prefixes not trained
    num_workers: int = 2  # the reading rank's loader workers
    prefetch_factor: int = 2
    max_live_parameters: int = 1_000_000_000
    reduce_bucket_size: int = 50_000_000
    image_size: int = 728
    crop_size: int = 504


@dataclass
class Part:
    name: str
    bytes: float
    detail: str
    transient: bool = False  # one of the step's moments: only the largest transient counts


def peak_bytes(parts: list[Part]) -> float:
    """What is kept, plus the largest transient."""
    transients = [part.bytes for part in parts if part.transient]
    return sum(part.bytes for part in parts if not part.transient) + max(transients, default=0.0)


@dataclass
class Estimate:
    gpu: list[Part] = field(default_factory=list)
    host: list[Part] = field(default_factory=list)
    budget_gib: float = 80.0

    @property
    def gpu_gib(self) -> float:
        return peak_bytes(self.gpu) / GIB

    @property
    def fits(self) -> bool:
        return self.gpu_gib <= self.budget_gib

    def table(self) -> str:
        rows = [f"{'part':<40}{'GiB':>9}  how"]
        rows += [f"{p.name + (' *' if p.transient else ''):<40}{p.bytes / GIB:>9.2f}  {p.detail}" for p in self.gpu]
        verdict = "fits" if self.fits else "does NOT fit"
        rows.append(f"{'GPU total':<40}{self.gpu_gib:>9.2f}  of {self.budget_gib:g} GiB: {verdict}")
        rows.append(f"{'':<40}{'':>9}  (* transient: only the largest counts)")
        rows += [f"{'host: ' + p.name:<40}{p.bytes / GIB:>9.2f}  {p.detail}" for p in self.host]
        return "\n".join(rows)


KEPT_WHOLE = ("vision_model.", "vit_large_projector.", "lm_head.")  # model.kept_whole()'s parameters


def parameter_counts(config: Step3VLConfig, frozen: tuple[str, ...], head: str = "lm_head") -> dict[str, int]:
    """Total and trainable parameters, those ZeRO-3 keeps whole, and the largest partitioned tensor, from
    the model built on the meta device; `head` "value" counts the critic (a scalar head for lm_head)."""
    model = build_on_meta(config)
    shapes = {name: p.numel() for name, p in model.named_parameters()}
    if head == "value":
        shapes = {n: c for n, c in shapes.items() if not n.startswith("lm_head.")} | {"value_head.weight": 1}
    return {
        "total": sum(shapes.values()),
        "trainable": sum(c for n, c in shapes.items() if not n.startswith(frozen)) if frozen else sum(shapes.values()),
        "kept_whole": sum(c for n, c in shapes.items() if n.startswith(KEPT_WHOLE)),
        "largest": max(c for n, c in shapes.items() if not n.startswith(KEPT_WHOLE)),
    }


def zero3_states(counts: dict[str, int], shape: TrainingShape, label: str) -> list[Part]:
    b, n = shape.bytes_per_param, shape.world
    total, trained, whole = counts["total"], counts["trainable"], counts["kept_whole"]
    return [
        Part(f"{label}: parameters", b * total / n, f"{b} B x {total / 1e9:.3f}B params / {n} ranks"),
        Part(f"{label}: kept whole", b * whole, f"{b} B x {whole / 1e9:.3f}B: tower, projector, head"),
        Part(f"{label}: fp32 master + Adam", 12 * trained / n, f"12 B x {trained / 1e9:.3f}B trained / {n}"),
        Part(f"{label}: fp32 grad partitions", 4 * trained / n, f"4 B x {trained / 1e9:.3f}B trained / {n}"),
    ]


def zero3_transients(counts: dict[str, int], shape: TrainingShape) -> list[Part]:
    b = shape.bytes_per_param
    live = max(shape.max_live_parameters, counts["largest"])
    largest = counts["largest"]
    return [
        Part("ZeRO-3 gathered parameters", b * live, f"{b} B x max(max_live_parameters, largest module)"),
        Part(
            "ZeRO-3 gradient reduce",
            (b + 4) * largest + 4 * shape.reduce_bucket_size,
            f"largest module's grad ({b} B) + fp32 copy, + fp32 bucket",
        ),
        Part(
            "gather of the kept-whole after a step",
            b * counts["kept_whole"],
            "one flat buffer, while no activation is alive",
            transient=True,
        ),
    ]


def decoder_parts(config: Step3VLConfig, shape: TrainingShape) -> list[Part]:
    text = config.text_config
    hidden, layers = text.hidden_size, text.num_hidden_layers
    q = text.num_attention_heads * text.head_dim
    kv = text.num_key_value_heads * text.head_dim
    b = shape.bytes_per_param
    tokens = shape.micro_batch * shape.seq_len // shape.sequence_parallel
    kept, peak = decoder_layer_bytes(text, b)
    parts = []
    if shape.checkpointing:
        checkpoints = b * layers * tokens * hidden
        parts.append(Part("decoder checkpoints", checkpoints, f"{layers} layers x {tokens} tokens x hidden"))
        parts.append(
            Part(
                "decoder layer recompute",
                peak * tokens,
                f"{tokens} tokens x {peak:,.0f} B (decoder_layer_bytes: {LAYER_PEAK})",
                transient=True,
            )
        )
    else:
        every = kept * layers * tokens
        parts.append(Part("decoder activations", every, f"{layers} layers x {tokens} x {kept:,.0f} B ({LAYER_KEPT})"))
    rows, length = shape.micro_batch, shape.seq_len
    if shape.attention in ("sdpa", "sdpa_packed", "eager"):
        parts.append(Part("attention mask", rows * length * length, f"{rows} x ({length} x {length}) bool"))
    if shape.attention == "flex_packed":
        blocks = -(-length // FLEX_BLOCK)
        parts.append(Part("flex block mask", rows * 16 * blocks**2, f"{rows} x 4 x ({blocks} x {blocks}) int32"))
    if shape.sequence_parallel > 1:
        parts.append(Part("Ulysses all-to-all", 2 * b * tokens * (q + 2 * kv), "q, k, v in both layouts"))
    head_tokens = min(shape.loss_chunk or tokens, tokens)
    parts.append(Part("scored and last hidden states", 4 * b * tokens * hidden, "scored, their grad, embeds, last"))
    parts.append(
        Part(
            "loss tile",
            (b + 8) * head_tokens * text.vocab_size + b * text.vocab_size * hidden,
            f"{head_tokens} x {text.vocab_size} logits x {b + 8} B, + the tile's head-weight grad",
            transient=True,
        )
    )
    return parts


def slice_views(config: Step3VLConfig, shape: TrainingShape) -> tuple[int, int]:
    """The most crops, and the most global views, one rank's slice of a micro-batch can need: as many as
    its tokens hold, within the packs' caps, and two more under sequence parallelism, where a view
    straddles each end of the slice."""
    patch = config.vision_config.patch_size
    crop_tokens = (shape.crop_size // (4 * patch)) ** 2 + 2  # with <patch_start>, <patch_end>
    global_tokens = (shape.image_size // (4 * patch)) ** 2 + 2
    sp = shape.sequence_parallel
    tokens = shape.micro_batch * shape.seq_len // sp
    edges = 2 if sp > 1 else 0
    crops = min(shape.max_views_per_pack * shape.micro_batch, tokens // crop_tokens + edges)
    globals_ = min(shape.max_images_per_pack * shape.micro_batch, tokens // global_tokens + edges)
    return crops, globals_


def vision_parts(config: Step3VLConfig, shape: TrainingShape) -> list[Part]:
    vision = config.vision_config
    width, mlp, layers = vision.width, vision.mlp_width, vision.layers
    b = shape.bytes_per_param
    crops, globals_ = slice_views(config, shape)
    crop_patches = (shape.crop_size // vision.patch_size) ** 2
    global_patches = (shape.image_size // vision.patch_size) ** 2
    pixels = max(crops * shape.crop_size**2, globals_ * shape.image_size**2) * 3 * b
    image_tokens = max(crops * crop_patches, globals_ * global_patches) // 16  # after the two stride-2 convs
    patches = max(crops * crop_patches, globals_ * global_patches)  # the worst case's, all calls
    chunk = shape.vision_chunk or max(crops, globals_)
    chunk_patches = chunk * global_patches  # a call of the larger view kind
    block = 9 * width + 4 * mlp
    worst = f"{crops} crops or {globals_} global views"
    if shape.frozen and "vision_model." in shape.frozen:  # frozen (RL): forward only, nothing kept
        return [
            Part("vision pixels", pixels, f"worst of {worst}, {b} B"),
            Part("vision tokens", b * image_tokens * config.hidden_size, "every call's output"),
            Part(
                "vision chunk",
                chunk_patches * block * b,
                f"{chunk} global views x one block's ({VIT_SAVED})",
                transient=True,
            ),
        ]
    parts = [
        Part("vision pixels", pixels, f"worst of {worst} a rank's slice, {b} B"),
        Part("vision tokens kept", 2 * b * image_tokens * config.hidden_size, "every call's output, and its grad"),
    ]
    if not shape.checkpointing:
        parts.append(
            Part("vision activations", patches * layers * block * b, f"{patches} patches x {layers} x ({VIT_SAVED})")
        )
    elif shape.vision_checkpoint == "blocks":
        parts.append(Part("vision block inputs", patches * layers * width * b, f"{patches} patches x {layers} x width"))
        parts.append(
            Part(
                "vision block recompute",
                chunk_patches * block * b,
                f"{chunk} global views x {global_patches} patches x ({VIT_SAVED})",
                transient=True,
            )
        )
    else:
        parts.append(
            Part(
                "vision call recompute",
                chunk_patches * layers * (width + block) * b,
                f"{chunk} global views x {global_patches} patches x {layers} x (width + {VIT_SAVED})",
                transient=True,
            )
        )
    return parts


def fixed_parts(gpu: list[Part]) -> list[Part]:
    rest = peak_bytes(gpu)
    return [
        Part("CUDA context, NCCL", CUDA_CONTEXT_GIB * GIB, "fixed"),
        Part("allocator fragmentation", FRAGMENTATION * rest, f"{FRAGMENTATION:.0%} of the above"),
    ]


def host_parts(config: Step3VLConfig, shape: TrainingShape) -> list[Part]:
    """The reading rank's shared memory: `num_workers` (a count: the caller resolves auto) prefetching
    packs of as many crops as a pack's tokens hold, within the views cap."""
    packs = shape.micro_batch * (shape.num_workers * shape.prefetch_factor + 1)
    whole_rows = replace(shape, micro_batch=1, sequence_parallel=1)
    views, _ = slice_views(config, whole_rows)
    per_pack = views * HOST_BYTES_PER_VIEW
    return [
        Part(
            "loader shared memory",
            packs * per_pack,
            f"{packs} packs in flight x {views} views x {HOST_BYTES_PER_VIEW / 2**20:.2f} MiB (uint8)",
        )
    ]


def estimate_training(config: Step3VLConfig, shape: TrainingShape, budget_gib: float) -> Estimate:
    """Pre-training and SFT: one model under ZeRO-3."""
    counts = parameter_counts(config, shape.frozen)
    gpu = zero3_states(counts, shape, "model") + zero3_transients(counts, shape)
    gpu += decoder_parts(config, shape) + vision_parts(config, shape)
    return Estimate(gpu + fixed_parts(gpu), host_parts(config, shape), budget_gib)


def rl_resident(config: Step3VLConfig, policy: TrainingShape, critic: TrainingShape) -> list[Part]:
    """What an RL training rank keeps between steps: the policy's and the critic's ZeRO-3 states."""
    policy_counts = parameter_counts(config, policy.frozen)
    critic_counts = parameter_counts(config, critic.frozen, head="value")
    return zero3_states(policy_counts, policy, "policy") + zero3_states(critic_counts, critic, "critic")


def estimate_rl(config: Step3VLConfig, policy: TrainingShape, critic: TrainingShape, budget_gib: float) -> Estimate:
    """An RL training rank: the policy's and the critic's ZeRO-3 states side by side, and the larger of the
    two models' working sets (they run one after the other). A colocated engine sleeps while the trainer
    works (its weights in host memory); `estimate_engine` counts the other moment, the rollout."""
    gpu = rl_resident(config, policy, critic)
    gpu += zero3_transients(parameter_counts(config, policy.frozen), policy)
    working = [decoder_parts(config, s) + vision_parts(config, s) for s in (policy, critic)]
    gpu += max(working, key=peak_bytes)
    return Estimate(gpu + fixed_parts(gpu), [], budget_gib)


@dataclass
class EngineShape:
    """A vLLM engine's settings (`rollout.*`) and the longest sequence it holds."""

    seq_len: int
    tensor_parallel: int = 1
    memory_utilization: float = 0.6
    colocated: bool = False


def kv_bytes_per_token(config: Step3VLConfig, tensor_parallel: int) -> float:
    text = config.text_config
    kv_heads = max(text.num_key_value_heads / tensor_parallel, 1)  # replicated beyond one head a GPU
    return 2 * text.num_hidden_layers * kv_heads * text.head_dim * 2


def estimate_engine(config: Step3VLConfig, engine: EngineShape, resident: list[Part], budget_gib: float) -> Estimate:
    """One GPU of a rollout engine; `resident` is what a colocated training rank keeps beside it."""
    weights = engine_weights(config, engine.tensor_parallel)
    cap = engine.memory_utilization * budget_gib * GIB
    per_token = kv_bytes_per_token(config, engine.tensor_parallel)
    pool = cap - weights.bytes
    gpu = [
        weights,
        Part(
            "engine: KV cache",
            pool,
            f"{engine.memory_utilization:g} x {budget_gib:g} GiB - weights; {per_token / 2**10:.0f} KiB a token:"
            f" {pool / (per_token * engine.seq_len):.1f} sequences of {engine.seq_len:,} tokens at once",
        ),
    ]
    return Estimate(beside_trainer(resident) + gpu if engine.colocated else gpu, [], budget_gib)


def engine_weights(config: Step3VLConfig, tensor_parallel: int) -> Part:
    weights = 2 * parameter_counts(config, ())["total"] / tensor_parallel
    return Part("engine: weights", weights, f"2 B x params / TP {tensor_parallel}")


def beside_trainer(resident: list[Part]) -> list[Part]:
    """What a colocated training rank keeps on the engine's GPU: its states and its CUDA context."""
    return [*resident, Part("trainer: CUDA context, NCCL", CUDA_CONTEXT_GIB * GIB, "fixed")]


def largest_tensor_bytes(config: Step3VLConfig) -> int:
    """The largest tensor a weight sync sends, in bf16 (the embeddings or the LM head)."""
    return 2 * max(p.numel() for p in build_on_meta(config).parameters())


def estimate_colocated_sync(
    config: Step3VLConfig, tensor_parallel: int, resident: list[Part], bucket_bytes: int, budget_gib: float
) -> Estimate:
    """A colocated GPU during the weight sync (rl/sync.py, CUDA IPC): the training rank's states, the engine's
    weights woken for the sync (its KV cache comes back after it), the ZeRO-3 gather feeding the sync, the
    rank's IPC buffer and the engine's copy of the chunk it reads from that buffer."""
    buffer = max(bucket_bytes, largest_tensor_bytes(config))
    weights = engine_weights(config, tensor_parallel)
    gpu = [
        *beside_trainer(resident),
        replace(weights, detail=f"{weights.detail}; KV cache not yet woken"),
        Part("sync: gathered bucket", buffer, "max(rollout.sync_bucket_mb, the largest tensor), bf16"),
        Part("sync: IPC buffer", buffer, "the same: vLLM's packed producer needs the largest tensor to fit"),
        Part("sync: engine's copy of a chunk", buffer, "vLLM clones each received tensor out of the buffer"),
    ]
    return Estimate(gpu, [], budget_gib)
