"""Which of a batch's views hold a given range of its image tokens.

Image tokens follow placeholder order: for each image, its crops (row-major), then its global view. A
sequence-parallel rank holds one slice of a row, so it needs only the views whose tokens fall in its
slice: a run of consecutive views in that order, hence a range of the global views and a range of the
crops. Without a range every view is needed.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass

import torch


class ImageTokenMismatchError(ValueError):
    """The image features do not fill the `<im_patch>` positions one for one."""


@dataclass
class ViewSelection:
    pieces: list[tuple[bool, int]]  # the needed views in placeholder order: (is_global, index in its tensor)
    globals: range  # indices into pixel_values
    crops: range  # indices into patch_pixel_values
    offset: int  # where the wanted tokens start within the needed views' tokens
    count: int  # wanted tokens
    view_offset: tuple[int, int] = (0, 0)  # the (global view, crop) the pixel tensors start at

    @classmethod
    def of(
        cls,
        pixel_values: torch.Tensor | None,
        patch_pixel_values: torch.Tensor | None,
        num_patches: list[int] | torch.Tensor | None,
        tokens_per_view: Callable[[int], int],
        token_range: tuple[int, int] | None = None,
        view_offset: tuple[int, int] | None = None,
    ) -> ViewSelection:
        """`tokens_per_view(side)`: image tokens of a square view of `side` pixels. `view_offset`: where the
        tensors hold only some of the batch's views (a sequence-parallel rank's, which may be none of a
        kind: a (0, 3, S, S) tensor), the (global view, crop) they start at; the counts then come from
        `num_patches`, and `globals_of`/`crops_of` index the held views."""
        if view_offset is None:
            num_globals = pixel_values.shape[0] if pixel_values is not None else 0
            num_crops = patch_pixel_values.shape[0] if patch_pixel_values is not None else 0
        else:
            num_globals, num_crops = len(num_patches), sum(int(n) for n in num_patches)
        global_tokens = tokens_per_view(pixel_values.shape[-1]) if num_globals else 0
        crop_tokens = tokens_per_view(patch_pixel_values.shape[-1]) if num_crops else 0
        selection = cls.of_views(num_globals, num_crops, global_tokens, crop_tokens, num_patches, token_range)
        selection.view_offset = view_offset or (0, 0)
        return selection

    @classmethod
    def of_views(
        cls,
        num_globals: int,
        num_crops: int,
        global_tokens: int,
        crop_tokens: int,
        num_patches: list[int] | torch.Tensor | None,
        token_range: tuple[int, int] | None = None,
    ) -> ViewSelection:
        """As `of`, from the views' counts and their image tokens each (views already encoded have no
        pixels to read them from)."""
        num_patches = [int(n) for n in num_patches] if num_patches is not None else [0] * num_globals
        if len(num_patches) != num_globals or sum(num_patches) != num_crops:
            raise ImageTokenMismatchError(
                f"num_patches {num_patches} does not match {num_globals} global views and {num_crops} crops"
            )
        views, at, crop_index = [], 0, itertools.count()  # (is_global, index, first token, end token)
        for image, crops in enumerate(num_patches):
            for _ in range(crops):
                views.append((False, next(crop_index), at, at + crop_tokens))
                at += crop_tokens
            views.append((True, image, at, at + global_tokens))
            at += global_tokens
        start, end = token_range if token_range is not None else (0, at)
        if end > at:
            if not num_globals:
                raise ImageTokenMismatchError("input_ids hold <im_patch> tokens but no pixel_values were given")
            raise ImageTokenMismatchError(
                f"input_ids hold at least {end} <im_patch> tokens but the images give {at} image tokens"
            )
        needed = [view for view in views if view[2] < end and view[3] > start] if end > start else []

        def indices(is_global: bool) -> range:
            chosen = [index for kind, index, _, _ in needed if kind == is_global]
            return range(chosen[0], chosen[-1] + 1) if chosen else range(0)

        offset = start - needed[0][2] if needed else 0
        return cls([(kind, index) for kind, index, _, _ in needed], indices(True), indices(False), offset, end - start)

    @property
    def num_globals(self) -> int:
        return len(self.globals)

    @property
    def num_crops(self) -> int:
        return len(self.crops)

    def globals_of(self, pixel_values: torch.Tensor | None) -> torch.Tensor | None:
        return _held(pixel_values, self.globals, self.view_offset[0], "global views")

    def crops_of(self, patch_pixel_values: torch.Tensor | None) -> torch.Tensor | None:
        return _held(patch_pixel_values, self.crops, self.view_offset[1], "crops")

    def assemble(self, globals_: torch.Tensor | None, crops: torch.Tensor | None) -> torch.Tensor | None:
        """The wanted tokens (count, hidden) from the needed views' encodings, (N, tokens, hidden) each in
        the order of `globals` and `crops`; None when none is wanted."""
        if not self.pieces:
            return None
        rows = [
            globals_[index - self.globals.start] if is_global else crops[index - self.crops.start]
            for is_global, index in self.pieces
        ]
        return torch.cat(rows)[self.offset : self.offset + self.count]


def _held(views: torch.Tensor | None, needed: range, first: int, kind: str) -> torch.Tensor | None:
    """The `needed` views out of `views`, which start at view `first`; None when none is needed."""
    if not len(needed):
        return None
    held = len(views) if views is not None else 0
    if needed.start < first or needed.stop > first + held:
        raise ImageTokenMismatchError(
            f"the image tokens wanted need {kind} {needed.start}..{needed.stop - 1}, but the pixels given hold "
            f"{first}..{first + held - 1}"
        )
    return views[needed.start - first : needed.stop - first]
