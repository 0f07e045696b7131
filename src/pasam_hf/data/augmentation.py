"""Geometric augmentation of an image and its instance masks to the model's square input (reference section 6).

Training: random horizontal flip, then large-scale jitter: keep the aspect ratio, resize so that the longest side
is `scale x S` with `scale ~ U(0.1, 2.0)`, crop a random `S x S` window where the result is larger than `S`, pad
to `S x S` at the bottom/right with 128 (image) and 0 (masks), as the release. Evaluation: resize the longest side
to `S` (SAM's own preprocessing geometry), no randomness; [`SamplePreparer`] then lets the image processor pad the
normalised image with 0, exactly as at inference.

Images are resized bilinearly (cv2). Masks, by default, as the release trains (reference section 6): bilinear
(`torch.nn.functional.interpolate`, `align_corners=False`, no antialias), so the labels become soft, float32 in
[0, 1] with fractional values at object edges, 255 where a void pixel is read (see
[`pasam_hf.data.resize_labels_bilinear`]). `label_interpolation="nearest"` keeps hard 0 / 1 / 255 uint8 labels
(cv2 nearest neighbour), which is the cleaner choice for new training (docs/architecture.md).
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from .masks import resize_labels_bilinear, resize_mask_nearest

IMAGE_PAD_VALUE = 128
MASK_PAD_VALUE = 0
LABEL_INTERPOLATIONS = ("bilinear", "nearest")


def check_label_interpolation(label_interpolation: str) -> None:
    if label_interpolation not in LABEL_INTERPOLATIONS:
        raise ValueError(
            f"label_interpolation={label_interpolation!r} is not one of {LABEL_INTERPOLATIONS}: 'bilinear' gives the "
            "release's soft labels, 'nearest' hard 0 / 1 / 255 labels."
        )


def _resize_pair(
    image: np.ndarray, masks: np.ndarray, height: int, width: int, label_interpolation: str = "bilinear"
) -> tuple[np.ndarray, np.ndarray]:
    """Image and masks to `height x width`; bilinear masks come back as float32 soft labels even at the same size."""
    if label_interpolation == "bilinear":
        masks = resize_labels_bilinear(masks, (height, width))
    elif masks.shape[1:] != (height, width):
        masks = resize_mask_nearest(masks, (height, width))
    if image.shape[:2] != (height, width):
        image = cv2.resize(image, (width, height), interpolation=cv2.INTER_LINEAR)
    return image, masks


def _pad_pair(
    image: np.ndarray, masks: np.ndarray, size: int, image_value: int, mask_value: int
) -> tuple[np.ndarray, np.ndarray]:
    """Pad `(h, w, 3)` / `(K, h, w)` with `h, w <= size` at the bottom/right to `size x size` (masks keep their
    dtype: uint8 hard labels or float32 soft ones)."""
    height, width = image.shape[:2]
    padded_image = np.full((size, size, 3), image_value, dtype=np.uint8)
    padded_image[:height, :width] = image
    padded_masks = np.full((masks.shape[0], size, size), mask_value, dtype=masks.dtype)
    padded_masks[:, :height, :width] = masks
    return padded_image, padded_masks


def _scaled_shape(height: int, width: int, longest: float) -> tuple[int, int]:
    factor = longest / max(height, width)
    return max(1, int(round(height * factor))), max(1, int(round(width * factor)))


def resize_longest(
    image: np.ndarray, masks: np.ndarray, size: int, label_interpolation: str = "nearest"
) -> tuple[np.ndarray, np.ndarray]:
    """Longest side to `size`, aspect ratio kept (`(H, W, 3)`, `(K, H, W)` -> `(h, w, 3)`, `(K, h, w)`; uint8
    masks, or float32 soft labels with `label_interpolation="bilinear"`).

    The rounding is SAM's (`int(side * size / longest + 0.5)`), so SAM's image processor, given the result, keeps
    its size and only normalises and pads it."""
    height, width = image.shape[:2]
    factor = size / max(height, width)
    new_height, new_width = max(1, int(height * factor + 0.5)), max(1, int(width * factor + 0.5))
    return _resize_pair(image, masks, new_height, new_width, label_interpolation)


def resize_longest_and_pad(
    image: np.ndarray,
    masks: np.ndarray,
    size: int,
    image_pad_value: int = IMAGE_PAD_VALUE,
    mask_pad_value: int = MASK_PAD_VALUE,
    label_interpolation: str = "nearest",
) -> tuple[np.ndarray, np.ndarray]:
    """Evaluation geometry: longest side to `size` (aspect ratio kept), then pad to `size x size`.

    Args:
        image (`np.ndarray` of shape `(H, W, 3)`, uint8), masks (`np.ndarray` of shape `(K, H, W)`, uint8).
        label_interpolation (`str`, defaults to `"nearest"`): `"bilinear"` for soft labels (see the module).

    Returns:
        `(image (size, size, 3), masks (K, size, size))`: uint8 image, uint8 or float32 masks.
    """
    image, masks = resize_longest(image, masks, size, label_interpolation)
    return _pad_pair(image, masks, size, image_pad_value, mask_pad_value)


@dataclass
class LargeScaleJitter:
    """Random flip + large-scale jitter to `size x size`.

    Args:
        size (`int`): the model's input side `S` (`processor.image_processor.size["longest_edge"]`).
        scale_range (`tuple[float, float]`, defaults to `(0.1, 2.0)`): range of `scale`, longest side / `S`.
        flip_probability (`float`, defaults to 0.5): probability of a horizontal flip.
        image_pad_value (`int`, defaults to 128), mask_pad_value (`int`, defaults to 0): padding values.
        label_interpolation (`str`, defaults to `"bilinear"`): how masks are resized: `"bilinear"` (the release:
            float32 soft labels) or `"nearest"` (uint8 hard labels).
    """

    size: int
    scale_range: tuple[float, float] = (0.1, 2.0)
    flip_probability: float = 0.5
    image_pad_value: int = IMAGE_PAD_VALUE
    mask_pad_value: int = MASK_PAD_VALUE
    label_interpolation: str = "bilinear"

    def __post_init__(self) -> None:
        check_label_interpolation(self.label_interpolation)
        low, high = self.scale_range
        if not 0 < low <= high:
            raise ValueError(f"scale_range={self.scale_range} must satisfy 0 < low <= high.")
        if not 0 <= self.flip_probability <= 1:
            raise ValueError(f"flip_probability={self.flip_probability} must be in [0, 1].")

    def __call__(
        self, image: np.ndarray, masks: np.ndarray, generator: np.random.Generator
    ) -> tuple[np.ndarray, np.ndarray]:
        """Augment one sample.

        Args:
            image (`np.ndarray` of shape `(H, W, 3)`, uint8), masks (`np.ndarray` of shape `(K, H, W)`, uint8).
            generator: the only source of randomness, so that a seeded generator reproduces the result.

        Returns:
            `(image (S, S, 3) uint8, masks (K, S, S))`, masks float32 soft labels or uint8 (see
            `label_interpolation`). Instances may lose all their foreground to the crop; callers drop or retry them.
        """
        if generator.random() < self.flip_probability:
            image = image[:, ::-1]
            masks = masks[:, :, ::-1]
        scale = generator.uniform(*self.scale_range)
        height, width = _scaled_shape(*image.shape[:2], scale * self.size)
        image, masks = _resize_pair(
            np.ascontiguousarray(image), np.ascontiguousarray(masks), height, width, self.label_interpolation
        )
        top = int(generator.integers(0, height - self.size + 1)) if height > self.size else 0
        left = int(generator.integers(0, width - self.size + 1)) if width > self.size else 0
        image = image[top : top + self.size, left : left + self.size]
        masks = masks[:, top : top + self.size, left : left + self.size]
        return _pad_pair(image, masks, self.size, self.image_pad_value, self.mask_pad_value)

    def evaluation(self, image: np.ndarray, masks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The deterministic evaluation geometry at the same size and padding (see [`resize_longest_and_pad`])."""
        return resize_longest_and_pad(
            image, masks, self.size, self.image_pad_value, self.mask_pad_value, self.label_interpolation
        )


__all__ = [
    "IMAGE_PAD_VALUE",
    "LABEL_INTERPOLATIONS",
    "MASK_PAD_VALUE",
    "LargeScaleJitter",
    "resize_longest",
    "resize_longest_and_pad",
]
