"""STEP3-VL: PE-lang vision tower -> two stride-2 convs -> linear projector -> transformers' Qwen3 decoder.

The module tree mirrors the released tensor names (`vision_model.*`, `vit_large_projector`, `model.*`,
`lm_head`), so `state_dict()` is the released layout with no key mapping.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers import GenerationMixin, PreTrainedModel, Qwen3Model
from transformers.modeling_outputs import CausalLMOutputWithPast

from step3vl_train.model.attention import sdpa_packed_attention  # noqa: F401  (importing it registers the kernel)
from step3vl_train.model.compute import ModelRuntime, zero_unreached_gradients
from step3vl_train.model.config import Step3VLConfig
from step3vl_train.model.sequence import IGNORE_INDEX, LocalSequence, local_sequence, shift_targets
from step3vl_train.model.token_scores import chunk_count, token_scores
from step3vl_train.model.view_features import ViewFeatures
from step3vl_train.model.view_selection import ImageTokenMismatchError, ViewSelection
from step3vl_train.model.vision import LayerScale, StepVisionEncoder, VisionAttention


@dataclass
class Step3VLOutput(CausalLMOutputWithPast):
    """`logits` for generation; `loss` in training; `logprobs` and `entropy` (B, L) for RL scoring."""

    logprobs: torch.Tensor | None = None
    entropy: torch.Tensor | None = None


# What transformers' Auto classes pass to a model class's `from_pretrained` besides the directory and config.
_AUTO_CLASS_OPTIONS = {"_from_auto", "adapter_kwargs", "revision", "trust_remote_code"}


class Step3VLForConditionalGeneration(PreTrainedModel, GenerationMixin):
    config: Step3VLConfig
    # Postponed annotations leave transformers only the name "Step3VLConfig" to derive this from.
    config_class = Step3VLConfig
    base_model_prefix = ""
    main_input_name = "input_ids"
    supports_gradient_checkpointing = True
    _no_split_modules = ["Qwen3DecoderLayer", "ResidualAttentionBlock"]
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True

    def __init__(self, config: Step3VLConfig):
        super().__init__(config)
        vision = config.vision_config
        self.vision_model = StepVisionEncoder(vision)
        self.vit_large_projector = nn.Linear(4 * vision.width, config.hidden_size, bias=config.projector_bias)
        self.model = Qwen3Model(config.text_config)
        self.add_head(config)
        self.runtime = ModelRuntime()  # one process; the trainer sets chunking, kernels and its ranks
        self.post_init()

    def add_head(self, config: Step3VLConfig) -> None:
        self.lm_head = nn.Linear(config.hidden_size, config.text_config.vocab_size, bias=False)

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if isinstance(module, StepVisionEncoder):
            # PE's initialisation for the parameters torch modules do not own.
            nn.init.normal_(module.positional_embedding, std=module.config.width**-0.5)
        elif isinstance(module, LayerScale):
            nn.init.constant_(module.gamma, module.init_value)
        elif isinstance(module, VisionAttention):
            nn.init.normal_(module.in_proj_weight, std=self.config.vision_config.initializer_range)
            nn.init.zeros_(module.in_proj_bias)

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.embed_tokens = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def encode_images(self, pixel_values: torch.Tensor, checkpoint_blocks: bool = False) -> torch.Tensor:
        """Square views (N, 3, S, S) -> decoder-width tokens (N, (S/56)^2, hidden): 728 -> 169, 504 -> 81."""
        return self.vit_large_projector(self.vision_features(pixel_values, checkpoint_blocks))

    def vision_features(self, pixel_values: torch.Tensor, checkpoint_blocks: bool = False) -> torch.Tensor:
        """The tower without the projector: square views (N, 3, S, S) -> (N, (S/56)^2, 4 x vision width).
        checkpoint_blocks: keep only each block's input for backward (`StepVisionEncoder.forward`)."""
        return self.vision_model.downsample(self.vision_model(pixel_values, checkpoint_blocks))

    @torch.no_grad()
    def precompute_view_features(
        self,
        pixel_values: torch.Tensor | None,
        patch_pixel_values: torch.Tensor | None,
        num_patches: list[int],
    ) -> ViewFeatures:
        """`vision_features` of these views, for `forward(image_features=...)` while the tower is frozen.
        Shapes as in `image_embeddings`. No collective: without gradients a rank runs the tower on its own
        views only (under ZeRO-3 the tower's weights are kept whole, train/engine.py: keep_whole)."""
        selection = ViewSelection.of(pixel_values, patch_pixel_values, num_patches, self.tokens_per_view)
        views = (pixel_values, patch_pixel_values)
        calls = self.vision_calls(selection)
        return ViewFeatures(
            *(self._encode_in_chunks(v, n, self.vision_features) for v, n in zip(views, calls, strict=True))
        )

    def _project_features(
        self, selection: ViewSelection, features: ViewFeatures | None, stand_in: bool, zero: torch.Tensor
    ) -> tuple[torch.Tensor | None, torch.Tensor]:
        """The selected image tokens' tower features through the projector in one call (None without
        features or tokens); without any, one zero stand-in call when `stand_in` (another rank projects)."""
        projector = self.vit_large_projector
        if features is not None and selection.pieces:
            tokens = selection.assemble(selection.globals_of(features.globals), selection.crops_of(features.crops))
            return projector(tokens), zero
        if stand_in:
            # The model's dtype, read without touching the projector's weight.
            stand_in_tokens = torch.zeros(1, projector.in_features, device=zero.device, dtype=self.dtype)
            zero = zero + projector(stand_in_tokens).sum() * 0
        return None, zero

    def image_embeddings(
        self,
        pixel_values: torch.Tensor | None,
        patch_pixel_values: torch.Tensor | None,
        num_patches: list[int] | torch.Tensor | None,
        token_range: tuple[int, int] | None = None,
        stand_in: bool = False,
        device: torch.device | None = None,
    ) -> tuple[torch.Tensor | None, torch.Tensor]:
        """Image tokens in placeholder order: for each image, its local crops (row-major), then its global view.

        pixel_values: (N_images, 3, S, S) global views of every image in the batch, in order;
        patch_pixel_values: (sum(num_patches), 3, s, s) their crops; num_patches: crops per image.
        token_range: [start, end) of the image tokens wanted (a sequence-parallel slice); only the views
        holding them go through the tower, `compute.vision_chunk` views a call. stand_in: where no view is
        needed, call the tower once on a zero stand-in all the same (another rank calls it: `decode`).
        device: where the stand-in is made (the model's by default): a text-only batch has no pixels to
        take it from.
        Returns (end - start, hidden), or None when no image token is wanted, and a scalar zero that
        depends on the stand-in call if any (add it to the result so that the stand-in is part of the graph).
        """
        selection = ViewSelection.of(pixel_values, patch_pixel_values, num_patches, self.tokens_per_view, token_range)
        return self._embed_views(selection, pixel_values, patch_pixel_values, stand_in, device)

    def _embed_views(
        self,
        selection: ViewSelection,
        pixel_values: torch.Tensor | None,
        patch_pixel_values: torch.Tensor | None,
        stand_in: bool,
        device: torch.device | None,
    ) -> tuple[torch.Tensor | None, torch.Tensor]:
        """`image_embeddings` for views already selected."""
        # A parameter's device is no gather under ZeRO-3.
        device = device if device is not None else self.vision_model.positional_embedding.device
        zero = torch.zeros((), device=device)
        global_calls, crop_calls = self.vision_calls(selection)
        globals_ = self._encode_in_chunks(selection.globals_of(pixel_values), global_calls)
        crops = self._encode_in_chunks(selection.crops_of(patch_pixel_values), crop_calls)
        if stand_in and not global_calls + crop_calls:
            side = 4 * self.config.vision_config.patch_size
            zero = zero + self._encode_in_chunks(torch.zeros(1, 3, side, side, device=device), 1).sum() * 0
        return selection.assemble(globals_, crops), zero

    def vision_calls(self, selection: ViewSelection) -> tuple[int, int]:
        """Tower calls for the selected global views and for the crops: `compute.vision_chunk` views a call,
        none for a kind with no view."""
        size = self.runtime.compute.vision_chunk
        return tuple(math.ceil(n / size) if size else int(n > 0) for n in (selection.num_globals, selection.num_crops))

    def _encode_in_chunks(
        self, views: torch.Tensor | None, calls: int, through: Callable | None = None
    ) -> torch.Tensor | None:
        """`views` through the tower in `calls` calls, split evenly in order (None without views).
        `through`: the tower and projector (`encode_images`) by default. When training with gradient
        checkpointing, `compute.vision_checkpoint` says what is kept for backward: each block's input
        ("blocks"), or only each call's output tokens, the call recomputed whole ("calls"). Either way a
        block runs forward twice a call, never three times."""
        if views is None or not len(views):
            return None
        through = through or self.encode_images
        checkpointed = self.is_gradient_checkpointing and self.training and torch.is_grad_enabled()
        if checkpointed and self.runtime.compute.vision_checkpoint == "calls":
            encode = partial(checkpoint, through, use_reentrant=False)
        else:
            encode = partial(through, checkpoint_blocks=checkpointed)
        return torch.cat([encode(chunk) for chunk in views.tensor_split(min(calls, len(views)))])

    def tokens_per_view(self, side: int) -> int:
        """Image tokens of a square view of `side` pixels after the two stride-2 convs."""
        return (side // (4 * self.config.vision_config.patch_size)) ** 2

    def embed(self, input_ids: torch.Tensor, image_embeds: torch.Tensor | None) -> torch.Tensor:
        """Token embeddings (B, L, hidden) with image tokens written over the `<im_patch>` positions, row-major."""
        embeds = self.model.embed_tokens(input_ids)
        if image_embeds is None:
            return embeds
        is_image = input_ids == self.config.image_token_id
        slots = int(is_image.sum())
        if slots != image_embeds.shape[0]:
            raise ImageTokenMismatchError(
                f"{slots} <im_patch> tokens (id {self.config.image_token_id}) in input_ids but the images give "
                f"{image_embeds.shape[0]} image tokens"
            )
        return embeds.masked_scatter(is_image.unsqueeze(-1), image_embeds.to(embeds.dtype))

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        past_key_values=None,
        inputs_embeds: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        patch_pixel_values: torch.Tensor | None = None,
        num_patches: list[int] | torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int = 0,
        num_items_in_batch: torch.Tensor | int | None = None,
        logprobs_temperature: float | None = None,
        return_entropy: bool = False,
        image_features: ViewFeatures | None = None,
        view_offset: tuple[int, int] | None = None,
        **kwargs,
    ) -> Step3VLOutput:
        """input_ids (B, L); labels (B, L) aligned with input_ids, -100 where no loss (shifted inside).
        view_offset: where pixel_values and patch_pixel_values hold only the views this rank's sequence
        slice needs (train/sequence_parallel.py: GroupLoader), the (global view, crop) they start at.

        Without labels: logits (B, L or logits_to_keep, vocab), for generation.
        With labels: the loss, the summed negative log-likelihood of the labelled tokens divided by
        `num_items_in_batch` (a global token count, for gradient accumulation and data parallelism) or by
        their number; the head runs only on labelled positions, `compute.loss_chunk` at a time, and no
        logits are returned. With `logprobs_temperature` as well: `logprobs` (B, L), log p(labels[t + 1])
        at position t under softmax(logits / temperature), 0 where unlabelled (RL's scores), and with
        `return_entropy` the entropy there too; no loss. Under sequence parallelism each rank computes its
        slice's and receives the whole batch's (`LocalSequence.to_batch`).
        """
        targets = shift_targets(labels) if labels is not None else None
        outputs, local = self.decode(
            input_ids,
            attention_mask,
            position_ids,
            past_key_values,
            inputs_embeds,
            pixel_values,
            patch_pixel_values,
            num_patches,
            use_cache,
            targets,
            image_features,
            view_offset=view_offset,
            **kwargs,
        )
        hidden = outputs.last_hidden_state
        if targets is None:
            logits = self.lm_head(hidden[:, -logits_to_keep:] if logits_to_keep else hidden)
            return Step3VLOutput(logits=logits, past_key_values=outputs.past_key_values)
        scored = local.targets != IGNORE_INDEX
        temperature = logprobs_temperature or 1.0
        want_entropy = return_entropy and logprobs_temperature is not None
        tiles = chunk_count(int(scored.sum()), self.runtime.compute.loss_chunk)
        logprobs, entropy = token_scores(
            self.lm_head, hidden[scored], local.targets[scored], tiles, temperature, want_entropy
        )
        if logprobs_temperature is None:
            count = num_items_in_batch if num_items_in_batch is not None else max(int(scored.sum()), 1)
            return Step3VLOutput(loss=-logprobs.sum() / count)
        group = self.runtime.sequence_group
        return Step3VLOutput(
            logprobs=local.to_batch(_scatter(logprobs, scored), group),
            entropy=local.to_batch(_scatter(entropy, scored), group) if want_entropy else None,
        )

    def decode(
        self,
        input_ids: torch.Tensor | None,
        attention_mask: torch.Tensor | None,
        position_ids: torch.Tensor | None,
        past_key_values,
        inputs_embeds: torch.Tensor | None,
        pixel_values: torch.Tensor | None,
        patch_pixel_values: torch.Tensor | None,
        num_patches: list[int] | torch.Tensor | None,
        use_cache: bool | None,
        targets: torch.Tensor | None = None,
        image_features: ViewFeatures | None = None,
        view_offset: tuple[int, int] | None = None,
        **kwargs,
    ):
        """The decoder's outputs (last_hidden_state, past_key_values) with the images embedded, and this
        rank's part of the batch (`LocalSequence`: flattened for varlen kernels, a slice under sequence
        parallelism, its `targets` sliced alike; None for a decode step).

        With gradients, every rank of `runtime.group` agrees here, in one small all-reduce, on whether the
        vision tower and the projector run (`_prefill_embeddings`)."""
        local = None
        if inputs_embeds is not None or not _is_prefill(past_key_values):
            # Embeddings given, or a decode step: the images are in the KV cache already.
            embeds = inputs_embeds if inputs_embeds is not None else self.embed(input_ids, None)
        else:
            if position_ids is not None and attention_mask is None:
                # Packed rows: transformers reads the samples' boundaries from the position ids only without
                # a KV cache; with one, the samples would attend to each other.
                use_cache = False
            local, embeds = self._prefill_embeddings(
                input_ids, attention_mask, position_ids, pixel_values, patch_pixel_values, num_patches, targets,
                image_features, view_offset,
            )  # fmt: skip
            attention_mask, position_ids = local.attention_mask, local.position_ids
        outputs = self.model(
            inputs_embeds=embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            use_cache=use_cache,
            **kwargs,
        )
        if local is not None and local.is_whole:
            outputs.last_hidden_state = outputs.last_hidden_state.reshape(*local.batch_shape, -1)
            local.targets = local.targets.reshape(local.batch_shape) if local.targets is not None else None
        return outputs, local

    def _prefill_embeddings(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        position_ids: torch.Tensor | None,
        pixel_values: torch.Tensor | None,
        patch_pixel_values: torch.Tensor | None,
        num_patches: list[int] | torch.Tensor | None,
        targets: torch.Tensor | None,
        image_features: ViewFeatures | None = None,
        view_offset: tuple[int, int] | None = None,
    ) -> tuple[LocalSequence, torch.Tensor]:
        """This rank's part of a fresh batch and its embeddings with the images in. With `image_features`
        (the frozen tower's output, rl/feature_cache.py) the pixels are not read: this rank calls the
        tower only as a stand-in for other ranks, and the projector once."""
        runtime = self.runtime
        # Sequence parallelism in training only: in eval mode (generation) DeepSpeed's Ulysses wrapper steps
        # aside and each rank runs whole rows.
        shard = (runtime.sequence_rank, runtime.sequence_parallel) if self.training else (0, 1)
        local = local_sequence(
            input_ids,
            attention_mask,
            position_ids,
            targets,
            self.config.image_token_id,
            flatten=runtime.flattens_packed_rows(self.model.config._attn_implementation),
            shard=shard,
        )
        image_range = (local.image_tokens_before, local.image_tokens_before + local.image_tokens)
        if image_features is None:
            selection = ViewSelection.of(
                pixel_values, patch_pixel_values, num_patches, self.tokens_per_view, image_range, view_offset
            )
            encoded, projects = selection, False  # the views the tower encodes; whether given features project
        else:
            selection = image_features.selection(num_patches, image_range)
            encoded, projects = ViewSelection.of_views(0, 0, 0, 0, []), bool(selection.pieces)
        device = local.input_ids.device
        wanted = [int(any(self.vision_calls(encoded))), int(projects)]
        # With gradients, one all-reduce: whether any rank calls the tower, and whether any projects given
        # features. Without, nothing is reduced and the weights are whole: a rank runs what it needs.
        tower, projector = runtime.agree(wanted, device) if torch.is_grad_enabled() else wanted
        image_embeds, zero = self._embed_views(encoded, pixel_values, patch_pixel_values, bool(tower), device)
        projected, zero = self._project_features(selection, image_features, bool(projector), zero)
        image_embeds = image_embeds if projected is None else projected
        if torch.is_grad_enabled():
            unreached = [] if tower else [*self.vision_model.parameters()]
            unreached += [] if tower or projector else [*self.vit_large_projector.parameters()]
            zero_unreached_gradients(unreached)
        return local, self.embed(local.input_ids, image_embeds) + zero

    def kept_whole(self) -> list[nn.Module]:
        """The modules a rank calls as often as its own batch needs, which ZeRO-3 keeps whole on every rank
        (train/engine.py: keep_whole): the vision tower and the projector, and the language-model head."""
        head = self.get_output_embeddings()
        return [self.vision_model, self.vit_large_projector, *([head] if head is not None else [])]

    def image_parameters(self) -> list[nn.Parameter]:
        """The tower's and the projector's weights: a forward in which no rank has an image calls neither."""
        return [*self.vision_model.parameters(), *self.vit_large_projector.parameters()]

    def save_pretrained(self, save_directory: str | Path, max_shard_size: str | int = "4GB") -> None:
        """Writes `config.json` and sharded safetensors with `model.safetensors.index.json`, released names."""
        from step3vl_train.model.checkpoint import save_released

        save_released(self, save_directory, max_shard_size=max_shard_size)

    @classmethod
    def from_pretrained(
        cls,
        directory: str | Path,
        dtype: torch.dtype | str | None = None,
        config: Step3VLConfig | None = None,
        **auto_class_options,
    ):
        """Reads a released-format directory; missing or unexpected tensors are an error listing them.

        dtype: the parameters' dtype, by name or "auto" as well; None or "auto" keep the stored one.
        config: instead of the directory's `config.json` (transformers' Auto classes pass the one they read).
        `auto_class_options` are the options the Auto classes hand every model class; none applies to a
        local directory, and any other option is an error naming it."""
        from step3vl_train.model.checkpoint import load_released

        unknown = sorted(set(auto_class_options) - _AUTO_CLASS_OPTIONS)
        if unknown:
            raise TypeError(f"{cls.__name__}.from_pretrained got unsupported option(s): {', '.join(unknown)}")
        if isinstance(dtype, str):
            dtype = None if dtype == "auto" else getattr(torch, dtype)
        return load_released(directory, dtype=dtype, config=config, model_class=cls)


def _is_prefill(past_key_values) -> bool:
    """A fresh prompt, as opposed to a decode step over a KV cache."""
    return past_key_values is None or past_key_values.get_seq_length() == 0


def _scatter(values: torch.Tensor, where: torch.Tensor) -> torch.Tensor:
    """(N,) values at the N True positions of `where`, zero elsewhere."""
    out = values.new_zeros(where.shape)
    out[where] = values
    return out
