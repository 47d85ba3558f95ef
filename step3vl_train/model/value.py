"""The critic and the scalar reward model: the policy's architecture with a scalar value head in place of
the language-model head."""

from __future__ import annotations

import torch
from torch import nn

from step3vl_train.model.config import Step3VLConfig
from step3vl_train.model.step3vl import Step3VLForConditionalGeneration
from step3vl_train.model.view_features import ViewFeatures

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
        image_features: ViewFeatures | None = None,
        **kwargs,
    ) -> torch.Tensor:
        """(B, L) float32: V(s_t) after each token (under sequence parallelism, the whole batch's on every
        rank of the group). `image_features`: as the policy's `forward` takes them."""
        outputs, local = self.decode(
            input_ids, attention_mask, position_ids, None, None, pixel_values, patch_pixel_values, num_patches, False,
            image_features=image_features,
        )  # fmt: skip
        values = self.value_head(outputs.last_hidden_state).squeeze(-1).float()
        return local.to_batch(values, self.runtime.sequence_group)


def last_token_scores(values: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, L) per-token values and (B, L) 0/1 mask -> (B,) the value at each row's last attended position:
    the score of a whole sequence, whichever side it is padded on and whatever the padding token is (no
    search for a pad or end-of-sequence id, which may also occur inside a row). A row with no attended
    position is an error."""
    attended = attention_mask.bool()
    if not attended.any(dim=1).all():
        raise ValueError("last_token_scores: a row of attention_mask has no attended position")
    positions = torch.arange(attended.shape[1], device=attended.device).expand_as(attended)
    last = torch.where(attended, positions, -1).amax(dim=1)
    return values.gather(1, last[:, None]).squeeze(1)
