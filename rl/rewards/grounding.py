"""Grounding rewards: the boxes and points of a response against the sample's reference `boxes`/`points`.

Coordinates in a response are `coords: norm1000` (0-1000 over the image's width and height, as in our
synthetic data and Qwen-VL-style models) or `coords: pixels`; the references are pixels of the first image.
Predictions and references are paired one to one by optimal assignment (scipy's `linear_sum_assignment`)
maximising the total score, and the total is divided by the larger of the two counts, so an extra or a
missing prediction costs.
"""

from __future__ import annotations

import math

import numpy as np
from scipy.optimize import linear_sum_assignment

from rl.rewards.coordinates import answer_coordinates
from rl.rewards.types import RewardRequest

COORDS = ("norm1000", "pixels")


def to_pixels(values: list[float], request: RewardRequest, coords: str) -> list[float]:
    """`[x, y, ...]` in `coords` as pixels of the request's image."""
    if coords not in COORDS:
        raise ValueError(f"coords must be one of {COORDS}, not {coords!r}")
    if coords == "pixels":
        return values
    if request.image_size is None:
        raise ValueError("norm1000 coordinates need the image size")
    width, height = request.image_size
    return [v * (width if i % 2 == 0 else height) / 1000 for i, v in enumerate(values)]


def box_iou(a: list[float], b: list[float]) -> float:
    inter_w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    inter_h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = inter_w * inter_h
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def matched_score(scores: np.ndarray) -> float:
    """`scores` (predictions x references): the best total over one-to-one pairings, divided by the larger
    of the two counts."""
    rows, cols = linear_sum_assignment(scores, maximize=True)
    return float(scores[rows, cols].sum()) / max(scores.shape)


def grounding_reward(request: RewardRequest, coords: str = "norm1000", iou_threshold: float = 0.5) -> float:
    """Boxes `[x0, y0, x1, y1]` against the reference boxes. A pair scores its IoU, or 0 below `iou_threshold`
    (strict shaping). The assignment maximises that score rather than the raw IoU, which could spend a
    reference on a pair below the threshold. A box that is inverted or off the image scores 0."""
    if not request.boxes:
        raise ValueError("grounding needs reference boxes")
    predicted = [to_pixels(box, request, coords) for box in answer_coordinates(request, 4)]
    scores = np.array(
        [[_box_score(box, list(map(float, ref)), request, iou_threshold) for ref in request.boxes] for box in predicted]
    )
    return matched_score(scores)


def _box_score(box: list[float], reference: list[float], request: RewardRequest, iou_threshold: float) -> float:
    if box[2] <= box[0] or box[3] <= box[1]:
        return 0.0
    if not (_on_image(box[:2], request.image_size) and _on_image(box[2:], request.image_size)):
        return 0.0
    iou = box_iou(box, reference)
    return iou if iou >= iou_threshold else 0.0


def _on_image(point: list[float], image_size: tuple[int, int] | None) -> bool:
    return image_size is None or (0 <= point[0] <= image_size[0] and 0 <= point[1] <= image_size[1])


def pointing_reward(request: RewardRequest, coords: str = "norm1000", radius: float = 0.05) -> float:
    """Points `[x, y]` or `(x, y)` against the reference points. A pair scores 1 at the reference, falling
    linearly to 0 at its reach: half the diagonal of the reference's box where `boxes` gives one per point
    (strict: a point outside the target's reach scores 0), otherwise `radius` times the image's diagonal.
    A point off the image scores 0."""
    if not request.points:
        raise ValueError("pointing needs reference points")
    reaches = _reaches(request, radius)
    predicted = [to_pixels(point, request, coords) for point in answer_coordinates(request, 2)]
    scores = np.array(
        [
            [
                _point_score(point, target, reach, request.image_size)
                for target, reach in zip(request.points, reaches, strict=True)
            ]
            for point in predicted
        ]
    )
    return matched_score(scores)


def point_in_box_reward(request: RewardRequest, coords: str = "norm1000") -> float:
    """GUI grounding's hit, as ScreenSpot scores it: 1 when the answer's first point `[x, y]` lies inside a
    reference box (the target element), else 0. A benchmark asks for one point: later ones are not read."""
    if not request.boxes:
        raise ValueError("point_in_box needs reference boxes (the target elements)")
    x, y = to_pixels(answer_coordinates(request, 2)[0], request, coords)
    return float(any(x0 <= x <= x1 and y0 <= y <= y1 for x0, y0, x1, y1 in request.boxes))


def _reaches(request: RewardRequest, radius: float) -> list[float]:
    if request.boxes:
        if len(request.boxes) != len(request.points):
            raise ValueError(
                f"pointing pairs each reference point with a box: {len(request.points)} points, "
                f"{len(request.boxes)} boxes"
            )
        return [math.hypot(x1 - x0, y1 - y0) / 2 for x0, y0, x1, y1 in request.boxes]
    if request.image_size is None:
        raise ValueError("pointing needs reference boxes or the image size")
    return [radius * math.hypot(*request.image_size)] * len(request.points)


def _point_score(point: list[float], target: list[float], reach: float, image_size: tuple[int, int] | None) -> float:
    if not _on_image(point, image_size):
        return 0.0
    return max(0.0, 1.0 - math.dist(point, target) / reach)
