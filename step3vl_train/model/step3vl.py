"""STEP3-VL: PE-lang vision tower -> two stride-2 convs -> linear projector -> transformers' Qwen3 decoder.

The module tree mirrors the released tensor names (`vision_model.*`, `vit_large_projector`, `model.*`,
`lm_head`), so `state_dict()` is the released layout with no key mapping.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import torch
from torch import nn
from transformers import GenerationMixin, PreTrainedModel, Qwen3Model
from transformers.loss.loss_utils import ForCausalLMLoss
from transformers.modeling_outputs import CausalLMOutputWithPast

from step3vl_train.model.config import Step3VLConfig
from step3vl_train.model.vision import LayerScale, StepVisionEncoder, VisionAttention


class ImageTokenMismatchError(ValueError):
    """The image features do not fill the `<im_patch>` positions one for one."""


class Step3VLForConditionalGeneration(PreTrainedModel, GenerationMixin):
    config: Step3VLConfig
    base_model_prefix = ""
    main_input_name = "input_ids"
    supports_gradient_checkpointing = True
    _no_split_modules = ["Qwen3DecoderLayer", "ResidualAttentionBlock"]
    _supports_sdpa = True
    _supports_flash_attn = True
    # Run the vision tower (on a dummy where needed) at every forward, even without gradients: ranks of a
    # ZeRO-3 group scoring different batches must make the same module calls (RL's log-prob passes).
    sync_vision_calls = False

    def __init__(self, config: Step3VLConfig):
        super().__init__(config)
        vision = config.vision_config
        self.vision_model = StepVisionEncoder(vision)
        self.vit_large_projector = nn.Linear(4 * vision.width, config.hidden_size, bias=config.projector_bias)
        self.model = Qwen3Model(config.text_config)
        self.add_head(config)
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

    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Square views (N, 3, S, S) -> decoder-width tokens (N, (S/56)^2, hidden): 728 -> 169, 504 -> 81."""
        features = self.vision_model.downsample(self.vision_model(pixel_values))
        return self.vit_large_projector(features)

    def image_embeddings(
        self,
        pixel_values: torch.Tensor | None,
        patch_pixel_values: torch.Tensor | None,
        num_patches: list[int] | torch.Tensor | None,
        keep_alive: bool = False,
        device: torch.device | None = None,
    ) -> tuple[torch.Tensor | None, torch.Tensor]:
        """Image tokens in placeholder order: for each image, its local crops (row-major), then its global view.

        pixel_values: (N_images, 3, S, S) global views of every image in the batch, in order;
        patch_pixel_values: (sum(num_patches), 3, s, s) their crops; num_patches: crops per image.
        Returns (total_image_tokens, hidden), or None when there is no image, and a scalar zero.

        The tower runs on the global views, then on the crops. With `keep_alive` (training), a view kind the
        batch lacks runs on a tiny zero image in its place, and the returned zero depends on it: every rank
        then calls the same modules in the same order every micro-step, which ZeRO-3 needs, as its parameter
        gathers are collectives (DeepSpeed#7170: a rank that skips the tower, or runs it later, hangs the
        others or mismatches their collectives). `device` places the zero image. No parameter is touched
        outside its module's forward: under ZeRO-3 such an access is an all-gather of its own.
        """
        zero = torch.zeros((), device=device)
        encoded = []
        for views in (pixel_values, patch_pixel_values):
            if _has_views(views):
                encoded.append(self.encode_images(views))
                continue
            encoded.append(None)
            if keep_alive:
                side = 4 * self.config.vision_config.patch_size
                zero = zero + self.encode_images(torch.zeros(1, 3, side, side, device=device)).sum() * 0
        globals_, crops = encoded
        if globals_ is None:
            return None, zero
        crops = crops if crops is not None else globals_[:0]
        num_patches = [int(n) for n in num_patches] if num_patches is not None else [0] * len(globals_)
        if len(num_patches) != len(globals_) or sum(num_patches) != len(crops):
            raise ImageTokenMismatchError(
                f"num_patches {num_patches} does not match {len(globals_)} global views and {len(crops)} crops"
            )
        pieces = []
        for image, crop_end in enumerate(itertools.accumulate(num_patches)):
            pieces += [crops[crop_end - num_patches[image] : crop_end].flatten(0, 1), globals_[image]]
        return torch.cat(pieces), zero

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
        **kwargs,
    ) -> CausalLMOutputWithPast:
        """input_ids (B, L); labels (B, L) aligned with input_ids, -100 where no loss (shifted inside).

        `num_items_in_batch` in kwargs normalises the summed loss by a global token count instead of
        this batch's mean (for gradient accumulation and data parallelism).
        """
        num_items_in_batch = kwargs.pop("num_items_in_batch", None)
        outputs = self.decode(
            input_ids,
            attention_mask,
            position_ids,
            past_key_values,
            inputs_embeds,
            pixel_values,
            patch_pixel_values,
            num_patches,
            use_cache,
            **kwargs,
        )
        hidden = outputs.last_hidden_state
        logits = self.lm_head(hidden[:, -logits_to_keep:] if logits_to_keep else hidden)
        loss = None
        if labels is not None:
            loss = ForCausalLMLoss(
                logits, labels, vocab_size=self.config.text_config.vocab_size, num_items_in_batch=num_items_in_batch
            )
        return CausalLMOutputWithPast(loss=loss, logits=logits, past_key_values=outputs.past_key_values)

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
        **kwargs,
    ):
        """The decoder's outputs (last_hidden_state, past_key_values) with the images embedded."""
        if inputs_embeds is None and not _is_prefill(past_key_values):
            # A decode step: the images are in the KV cache already (generate keeps passing some of them).
            inputs_embeds = self.embed(input_ids, None)
        elif inputs_embeds is None:
            keep_alive = (self.training and torch.is_grad_enabled()) or self.sync_vision_calls
            image_embeds, zero = self.image_embeddings(
                pixel_values, patch_pixel_values, num_patches, keep_alive, input_ids.device
            )
            if image_embeds is None and (input_ids == self.config.image_token_id).any():
                raise ImageTokenMismatchError("input_ids hold <im_patch> tokens but no pixel_values were given")
            inputs_embeds = self.embed(input_ids, image_embeds) + zero
        return self.model(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            use_cache=use_cache,
            **kwargs,
        )

    def save_pretrained(self, save_directory: str | Path, max_shard_size: str | int = "4GB") -> None:
        """Writes `config.json` and sharded safetensors with `model.safetensors.index.json`, released names."""
        from step3vl_train.model.checkpoint import save_released

        save_released(self, save_directory, max_shard_size=max_shard_size)

    @classmethod
    def from_pretrained(cls, directory: str | Path, dtype: torch.dtype | None = None):
        """Reads a released-format directory; missing or unexpected tensors are an error listing them."""
        from step3vl_train.model.checkpoint import load_released

        return load_released(directory, dtype=dtype)


def _is_prefill(past_key_values) -> bool:
    """A fresh prompt, as opposed to a decode step over a KV cache."""
    return past_key_values is None or past_key_values.get_seq_length() == 0


def _has_views(pixels: torch.Tensor | None) -> bool:
    return pixels is not None and pixels.shape[0] > 0
