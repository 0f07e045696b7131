"""Geometric augmentation of an image and its instance masks to the model's square input (reference section 6).

Training: random horizontal flip, then large-scale jitter: keep the aspect ratio, resize so that the longest side
is `scale x S` with `scale ~ U(0.1, 2.0)`, crop a random `S x S` window where the result is larger than `S`, pad
to `S x S` at the bottom/right with 128 (image) and 0 (masks), as the release. Evaluation: resize the longest side
to `S` (SAM's own preprocessing geometry), no randomness; [`SamplePreparer`] then lets the image processor pad the
normalised image with 0, exactly as at inference.

Images are resized bilinearly, masks with nearest neighbour (cv2), so labels (0 / 1 / 255) are never blended.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from .masks import resize_mask_nearest

IMAGE_PAD_VALUE = 128
MASK_PAD_VALUE = 0


def _resize_pair(image: np.ndarray, masks: np.ndarray, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    if image.shape[:2] == (height, width):
        return image, masks
    image = cv2.resize(image, (width, height), interpolation=cv2.INTER_LINEAR)
    return image, resize_mask_nearest(masks, (height, width))


def _pad_pair(
    image: np.ndarray, masks: np.ndarray, size: int, image_value: int, mask_value: int
) -> tuple[np.ndarray, np.ndarray]:
    """Pad `(h, w, 3)` / `(K, h, w)` with `h, w <= size` at the bottom/right to `size x size`."""
    height, width = image.shape[:2]
    padded_image = np.full((size, size, 3), image_value, dtype=np.uint8)
    padded_image[:height, :width] = image
    padded_masks = np.full((masks.shape[0], size, size), mask_value, dtype=np.uint8)
    padded_masks[:, :height, :width] = masks
    return padded_image, padded_masks


def _scaled_shape(height: int, width: int, longest: float) -> tuple[int, int]:
    factor = longest / max(height, width)
    return max(1, int(round(height * factor))), max(1, int(round(width * factor)))


def resize_longest(image: np.ndarray, masks: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Longest side to `size`, aspect ratio kept (`(H, W, 3)`, `(K, H, W)` -> `(h, w, 3)`, `(K, h, w)`, uint8).

    The rounding is SAM's (`int(side * size / longest + 0.5)`), so SAM's image processor, given the result, keeps
    its size and only normalises and pads it."""
    height, width = image.shape[:2]
    factor = size / max(height, width)
    new_height, new_width = max(1, int(height * factor + 0.5)), max(1, int(width * factor + 0.5))
    return _resize_pair(image, masks, new_height, new_width)


def resize_longest_and_pad(
    image: np.ndarray,
    masks: np.ndarray,
    size: int,
    image_pad_value: int = IMAGE_PAD_VALUE,
    mask_pad_value: int = MASK_PAD_VALUE,
) -> tuple[np.ndarray, np.ndarray]:
    """Evaluation geometry: longest side to `size` (aspect ratio kept), then pad to `size x size`.

    Args:
        image (`np.ndarray` of shape `(H, W, 3)`, uint8), masks (`np.ndarray` of shape `(K, H, W)`, uint8).

    Returns:
        `(image (size, size, 3), masks (K, size, size))`, both uint8.
    """
    image, masks = resize_longest(image, masks, size)
    return _pad_pair(image, masks, size, image_pad_value, mask_pad_value)


@dataclass
class LargeScaleJitter:
    """Random flip + large-scale jitter to `size x size`.

    Args:
        size (`int`): the model's input side `S` (`processor.image_processor.size["longest_edge"]`).
        scale_range (`tuple[float, float]`, defaults to `(0.1, 2.0)`): range of `scale`, longest side / `S`.
        flip_probability (`float`, defaults to 0.5): probability of a horizontal flip.
        image_pad_value (`int`, defaults to 128), mask_pad_value (`int`, defaults to 0): padding values.
    """

    size: int
    scale_range: tuple[float, float] = (0.1, 2.0)
    flip_probability: float = 0.5
    image_pad_value: int = IMAGE_PAD_VALUE
    mask_pad_value: int = MASK_PAD_VALUE

    def __post_init__(self) -> None:
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
            `(image (S, S, 3), masks (K, S, S))`, both uint8. Instances may lose all their foreground to the crop;
            callers drop or retry them.
        """
        if generator.random() < self.flip_probability:
            image = image[:, ::-1]
            masks = masks[:, :, ::-1]
        scale = generator.uniform(*self.scale_range)
        height, width = _scaled_shape(*image.shape[:2], scale * self.size)
        image, masks = _resize_pair(np.ascontiguousarray(image), np.ascontiguousarray(masks), height, width)
        top = int(generator.integers(0, height - self.size + 1)) if height > self.size else 0
        left = int(generator.integers(0, width - self.size + 1)) if width > self.size else 0
        image = image[top : top + self.size, left : left + self.size]
        masks = masks[:, top : top + self.size, left : left + self.size]
        return _pad_pair(image, masks, self.size, self.image_pad_value, self.mask_pad_value)

    def evaluation(self, image: np.ndarray, masks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The deterministic evaluation geometry at the same size and padding (see [`resize_longest_and_pad`])."""
        return resize_longest_and_pad(image, masks, self.size, self.image_pad_value, self.mask_pad_value)


__all__ = ["IMAGE_PAD_VALUE", "MASK_PAD_VALUE", "LargeScaleJitter", "resize_longest", "resize_longest_and_pad"]
