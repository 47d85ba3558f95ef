"""The critic: the policy's architecture with a scalar value head in place of the language-model head."""

from __future__ import annotations

import torch
from torch import nn

from step3vl_train.model.config import Step3VLConfig
from step3vl_train.model.step3vl import Step3VLForConditionalGeneration

# Tensors of a policy checkpoint that the critic has no use for, and critic tensors no policy has.
POLICY_ONLY = ("lm_head.",)
CRITIC_ONLY = ("value_head.",)


class Step3VLForValue(Step3VLForConditionalGeneration):
    def add_head(self, config: Step3VLConfig) -> None:
        self.value_head = nn.Linear(config.hidden_size, 1)

    def get_output_embeddings(self) -> None:
        return None

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        patch_pixel_values: torch.Tensor | None = None,
        num_patches: list[int] | torch.Tensor | None = None,
        **kwargs,
    ) -> torch.Tensor:
        """(B, L) float32: V(s_t) after each token."""
        outputs, _, _ = self.decode(
            input_ids, attention_mask, position_ids, None, None, pixel_values, patch_pixel_values, num_patches, False
        )
        hidden = outputs.last_hidden_state
        return self.value_head(hidden).squeeze(-1).float()
