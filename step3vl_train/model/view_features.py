"""The frozen vision tower's output for a batch's views, handed to the model in place of their pixels.

`Step3VLForConditionalGeneration.vision_features` is the tower and its two downsampling convs, without the
projector: while the tower is frozen these features do not change, so RL computes them once per prompt per
iteration (rl/feature_cache.py) and every forward of that iteration applies its own projector to them
(`forward(image_features=...)`), which keeps the projector trainable and lets the critic share them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from step3vl_train.model.view_selection import ViewSelection


@dataclass
class ViewFeatures:
    """Tower features of every view of a batch, in the order of its pixel tensors: `globals` (N_images,
    T_global, 4 x vision width) beside `pixel_values`, `crops` (ΣN_crops, T_crop, 4 x vision width) beside
    `patch_pixel_values`; None where there are none."""

    globals: torch.Tensor | None
    crops: torch.Tensor | None

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.globals, self.crops) if t is not None)

    def selection(
        self, num_patches: list[int] | torch.Tensor | None, token_range: tuple[int, int] | None = None
    ) -> ViewSelection:
        """The views holding image tokens [start, end) of the batch (all of them without a range)."""
        num_globals, global_tokens = self.globals.shape[:2] if self.globals is not None else (0, 0)
        num_crops, crop_tokens = self.crops.shape[:2] if self.crops is not None else (0, 0)
        return ViewSelection.of_views(num_globals, num_crops, global_tokens, crop_tokens, num_patches, token_range)

    def split(self, images: Sequence[int], crops: Sequence[int]) -> list[ViewFeatures]:
        """One ViewFeatures per sample, the k-th holding `images[k]` global views and `crops[k]` crops."""
        globals_ = _split(self.globals, images)
        crops_ = _split(self.crops, crops)
        return [ViewFeatures(g, c) for g, c in zip(globals_, crops_, strict=True)]

    @classmethod
    def cat(cls, parts: Sequence[ViewFeatures]) -> ViewFeatures:
        """The samples' features one after the other, as `collate` concatenates their pixels."""
        return cls(_cat([p.globals for p in parts]), _cat([p.crops for p in parts]))


def _split(tensor: torch.Tensor | None, sizes: Sequence[int]) -> list[torch.Tensor | None]:
    if tensor is None:
        if any(sizes):
            raise ValueError(f"no features to split into {list(sizes)} views")
        return [None] * len(sizes)
    return [part if len(part) else None for part in tensor.split(list(sizes))]


def _cat(tensors: Sequence[torch.Tensor | None]) -> torch.Tensor | None:
    present = [t for t in tensors if t is not None]
    return torch.cat(present) if present else None
