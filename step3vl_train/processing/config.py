"""Image-processing settings; the defaults are the released processor's constants (spec section 3)."""

from dataclasses import dataclass, fields
from typing import Any

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
CROP_RULES = ("released", "vllm")


@dataclass(frozen=True)
class ProcessorConfig:
    image_size: int = 728  # global view side, pixels
    crop_size: int = 504  # local crop side, pixels
    max_image_size: int = 3024  # longer side is capped to this before planning
    patch_size: int = 14  # ViT patch side
    downsample_stride: int = 4  # two stride-2 convs
    enable_patch: bool = True  # False: global view only (171 tokens an image at full size)
    # An image whose long side is `image_size` exactly: "released" gives it crops only when elongated
    # (processing_step3.py's `long <= 728`); "vllm" plans it as a large image (vLLM 0.33's `long < 728`), so
    # a 728x728 image gets 4 crops. RL with vLLM rollouts needs "vllm" (configs/rollout/vllm.yaml sets it).
    crop_rule: str = "released"
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD

    def __post_init__(self) -> None:
        if self.crop_rule not in CROP_RULES:
            raise ValueError(f"processor crop_rule must be one of {CROP_RULES}, not {self.crop_rule!r}")

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "ProcessorConfig":
        """From a YAML/JSON mapping; unknown keys are an error naming them."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown processor config field(s): {', '.join(unknown)}")
        return cls(**{k: tuple(v) if k in ("mean", "std") else v for k, v in values.items()})

    def tokens_per_side(self, side: int) -> int:
        """Projected tokens along one side of a `side`-pixel square: 728 -> 13, 504 -> 9."""
        grid = side // self.patch_size
        for _ in range(self.downsample_stride.bit_length() - 1):
            grid = (grid + 1) // 2  # Conv2d(k=3, s=2, p=1)
        return grid

    @property
    def global_tokens(self) -> int:
        return self.tokens_per_side(self.image_size) ** 2

    @property
    def crop_tokens(self) -> int:
        return self.tokens_per_side(self.crop_size) ** 2
