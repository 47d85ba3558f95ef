"""The frozen vision tower's features of an iteration's image prompts, computed once per prompt.

Every response to a prompt carries the prompt's pixels, so without this each of its `rollout.n` responses
would run the tower again in every pass of the iteration: scoring, each minibatch of the update, the critic.
A training rank instead computes each of its prompts' features once, when the iteration's scoring starts,
and its forwards take them in place of the pixels (`forward(image_features=...)`); each model still applies
its own projector, which trains. A rank keeps the same responses for scoring and for the update
(rl/iteration.py, `rank_shares`), so its cache serves both.

The features are the tower's output, valid only while the tower does not train: `RLConfig` refuses a cache
for a role whose `freeze` leaves `vision_model.` trainable, and `ImageFeatureCache` checks the weights. The
cache holds at most `image_feature_cache_mb`; prompts beyond it are counted and their forwards run the tower
on their pixels, as without the cache.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import nn

from rl.experience import Response
from step3vl_train.model.step3vl import Step3VLForConditionalGeneration
from step3vl_train.model.view_features import ViewFeatures
from step3vl_train.processing.pixels import PixelViews, model_pixels
from step3vl_train.processing.processor import ProcessedSample


class ImageFeatureCache:
    def __init__(self, model: Step3VLForConditionalGeneration, cap_mb: float, role: str):
        """`model`: whose tower computes the features; `role`: its config section, for errors."""
        if any(param.requires_grad for param in model.vision_model.parameters()):
            raise ValueError(
                f"{role}.image_feature_cache_mb={cap_mb} keeps the vision tower's features for an iteration, "
                f"which needs the tower frozen: add vision_model. to {role}.freeze, or set it to 0"
            )
        self.model, self.cap_bytes = model, int(cap_mb * 2**20)
        self.entries: dict[int, tuple[str, ViewFeatures]] = {}  # by the response's group: (prompt key, features)
        self.over_cap: set[int] = set()  # groups whose features did not fit

    def reset(self) -> None:
        """Drops every feature (at the end of an iteration: the memory goes back before the next rollout)."""
        self.entries, self.over_cap = {}, set()

    @property
    def nbytes(self) -> int:
        return sum(features.nbytes for _, features in self.entries.values())

    def fill(self, responses: Sequence[Response], device: torch.device, dtype: torch.dtype) -> None:
        """Features of the image prompts among `responses` not cached yet, as many as fit under the cap, in
        the order they first appear."""
        chosen, planned = {}, self.nbytes
        for response in responses:
            group, sample = response.group, response.prompt.sample
            if sample.pixels is None or group in self.entries or group in chosen or group in self.over_cap:
                continue
            size = self._planned_bytes(sample.pixels, dtype)
            if planned + size > self.cap_bytes:
                self.over_cap.add(group)
                continue
            chosen[group], planned = response.prompt, planned + size
        parts = encode_samples(self.model, [prompt.sample for prompt in chosen.values()], device, dtype)
        for (group, prompt), part in zip(chosen.items(), parts, strict=True):
            self.entries[group] = (prompt.key, part)

    def batch(self, responses: Sequence[Response]) -> ViewFeatures | None:
        """The features of these rows' images in row order, as `collate` lays out their pixels; None where a
        row's prompt has images with no features here (over the cap), and then the forward runs the tower
        on the pixels, or where no row has an image."""
        parts = []
        for response in responses:
            if response.prompt.sample.pixels is None:
                continue
            entry = self.entries.get(response.group)
            if entry is None:
                return None
            key, features = entry
            if key != response.prompt.key:
                raise RuntimeError(
                    f"image features cached for group {response.group} are those of prompt {key}, not of "
                    f"{response.prompt.key}: the responses changed between scoring and the update"
                )
            parts.append(features)
        return ViewFeatures.cat(parts) if parts else None

    def stats(self) -> dict[str, float]:
        """This rank's figures for the iteration's row (the driver adds the ranks' up)."""
        return {
            "image_cache/prompts": len(self.entries),
            "image_cache/over_cap": len(self.over_cap),
            "image_cache/mib": self.nbytes / 2**20,
        }

    def _planned_bytes(self, pixels: PixelViews, dtype: torch.dtype) -> int:
        """What the features of these views will take: (tokens a view) x 4 x the vision width, each."""
        tokens = self.model.tokens_per_view
        spec, width = pixels.spec, self.model.config.vision_config.width
        count = len(pixels.sources) * tokens(spec.image_size) + pixels.num_crops * tokens(spec.crop_size)
        return count * 4 * width * torch.empty((), dtype=dtype).element_size()


def encode_samples(
    model: Step3VLForConditionalGeneration,
    samples: Sequence[ProcessedSample],
    device: torch.device,
    dtype: torch.dtype,
) -> list[ViewFeatures]:
    """Each sample's tower features (`precompute_view_features`), the views of all of them encoded together.
    Every sample has images."""
    pixels = PixelViews.cat([s.pixels for s in samples]) if samples else None
    globals_, crops = model_pixels(pixels, device, dtype) if pixels is not None else (None, None)
    num_patches = [n for s in samples for n in s.num_patches]
    features = model.precompute_view_features(globals_, crops, num_patches)
    return features.split([len(s.num_patches) for s in samples], [sum(s.num_patches) for s in samples])


def same_tower(a: nn.Module, b: nn.Module, device: torch.device) -> bool:
    """Whether two models' vision towers hold the same weights on every rank: each rank compares its own
    ZeRO-3 partitions (models of one shape are partitioned alike), then the ranks agree. A collective where
    torch.distributed is initialised."""
    pairs = zip(a.vision_model.parameters(), b.vision_model.parameters(), strict=True)
    local = all(torch.equal(_partition(p), _partition(q)) for p, q in pairs)
    flag = torch.tensor(int(local), device=device)
    if dist.is_initialized():
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag)


def _partition(param: nn.Parameter) -> torch.Tensor:
    return param.ds_tensor if hasattr(param, "ds_tensor") else param.data
