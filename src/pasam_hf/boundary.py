"""Mask boundaries by erosion (Cheng et al., Boundary IoU, 2021), batched in torch.

Used by the uncertainty loss (band width 0.005 x diagonal) and by the boundary IoU metric (0.02 x diagonal).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def boundary_width(height: int, width: int, dilation_ratio: float) -> int:
    """Band width in pixels: `round(dilation_ratio * image diagonal)`, at least 1."""
    return max(1, int(round(dilation_ratio * math.sqrt(height**2 + width**2))))


def erode(masks: torch.Tensor, iterations: int, border_value: float = 0.0) -> torch.Tensor:
    """Binary erosion with a 3x3 square, `iterations` times, outside the image counted as `border_value`.

    Iterating a 3x3 erosion `d` times equals one erosion by a `(2d+1)` square: a pixel survives when its whole
    window is foreground. The window sums come from an integral image, O(1) per pixel whatever `d` (a min-pool
    costs O(d^2) per pixel: minutes for a 2000x3000 mask at the metric's d = 72), and are exact integers.

    Args:
        masks (`torch.Tensor` of shape `(..., H, W)`): binary masks (bool or {0, 1}).

    Returns:
        `torch.Tensor` of the same shape, bool.
    """
    shape = masks.shape
    side = 2 * iterations + 1
    flat = masks.reshape(-1, *shape[-2:]).to(torch.int32)
    padded = F.pad(flat, (iterations,) * 4, value=int(border_value))
    integral = F.pad(padded.cumsum(-1).cumsum(-2), (1, 0, 1, 0))
    window = (
        integral[:, side:, side:] - integral[:, :-side, side:] - integral[:, side:, :-side] + integral[:, :-side, :-side]
    )
    return (window == side * side).reshape(shape)


def mask_to_boundary(masks: torch.Tensor, dilation_ratio: float = 0.02, border_value: float = 0.0) -> torch.Tensor:
    """Inner boundary band of binary masks: the mask minus its erosion by `round(dilation_ratio x diagonal)`.

    `border_value=0` counts the image border as background (pixels along it are boundary); `border_value=1`
    does not, which is how the background's boundary is taken for the uncertainty target.

    Args:
        masks (`torch.Tensor` of shape `(..., H, W)`): binary masks.

    Returns:
        `torch.Tensor` bool of the same shape.
    """
    masks = masks.bool()
    height, width = masks.shape[-2:]
    iterations = boundary_width(height, width, dilation_ratio)
    return masks & ~erode(masks, iterations, border_value)


__all__ = ["boundary_width", "erode", "mask_to_boundary"]
