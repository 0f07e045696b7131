"""Procedural thin-structure images with exact masks, for the offline demo, docs and tests.

Thin structures (wires, rings, fences, text strokes) are where PA-SAM's adapter matters most: SAM's 256x256 mask
logits blur anything a few pixels wide. Each sample draws one such object on a textured background (noise,
gradients, stripes). The object is drawn without anti-aliasing, so the mask is exactly the set of pixels painted in
the object's colour; noise added afterwards changes colours, never which pixel belongs to the object.

Everything is a pure function of a `numpy.random.Generator`, so a seed fixes the data set.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import cv2
import numpy as np
import PIL.Image

if TYPE_CHECKING:
    from .data.records import SegmentationRecord

# A sample is redrawn when its object covers less or more than this fraction of the image (e.g. a curve that left
# the picture, or text scaled too big), so every mask is non-empty and not full.
MIN_FOREGROUND_FRACTION = 0.002
MAX_FOREGROUND_FRACTION = 0.6
_MAX_ATTEMPTS = 20

STRUCTURE_KINDS = ("wire", "ring", "fence", "text")
BACKGROUND_KINDS = ("noise", "gradient", "stripes")
_WORDS = ("PA-SAM", "wire", "edge", "mask", "thin", "fence", "ring", "SAM", "HQ", "line")


# ---------------------------------------------------------------------------------------------------- backgrounds
def _noise_background(rng: np.random.Generator, size: int) -> np.ndarray:
    # Smooth noise: random values on a coarse grid, upsampled, plus a little per-pixel grain.
    cells = int(rng.integers(4, 16))
    coarse = rng.uniform(0, 255, size=(cells, cells, 3)).astype(np.float32)
    smooth = cv2.resize(coarse, (size, size), interpolation=cv2.INTER_CUBIC)
    return smooth + rng.normal(0, 8, size=(size, size, 3)).astype(np.float32)


def _gradient_background(rng: np.random.Generator, size: int) -> np.ndarray:
    angle = rng.uniform(0, 2 * np.pi)
    yy, xx = np.mgrid[:size, :size].astype(np.float32) / max(size - 1, 1)
    ramp = np.cos(angle) * xx + np.sin(angle) * yy
    ramp = (ramp - ramp.min()) / max(float(ramp.max() - ramp.min()), 1e-6)
    start, end = rng.uniform(0, 255, size=(2, 3)).astype(np.float32)
    return start + ramp[..., None] * (end - start)


def _stripes_background(rng: np.random.Generator, size: int) -> np.ndarray:
    angle = rng.uniform(0, np.pi)
    period = rng.uniform(size / 24, size / 6)
    yy, xx = np.mgrid[:size, :size].astype(np.float32)
    phase = (np.cos(angle) * xx + np.sin(angle) * yy) * (2 * np.pi / period)
    wave = 0.5 + 0.5 * np.sin(phase)
    low, high = rng.uniform(0, 255, size=(2, 3)).astype(np.float32)
    return low + wave[..., None] * (high - low)


_BACKGROUNDS: dict[str, Callable[[np.random.Generator, int], np.ndarray]] = {
    "noise": _noise_background,
    "gradient": _gradient_background,
    "stripes": _stripes_background,
}


# ------------------------------------------------------------------------------------------------------ structures
# Each draws the object with value 1 into a uint8 (size, size) canvas, in place, without anti-aliasing.
def _thickness(rng: np.random.Generator, size: int) -> int:
    return int(rng.integers(1, max(2, size // 64) + 1))


def _draw_wire(canvas: np.ndarray, rng: np.random.Generator) -> None:
    """One to three cubic Bezier curves across the image (cables, branches)."""
    size = canvas.shape[0]
    t = np.linspace(0, 1, 4 * size)[:, None]
    for _ in range(int(rng.integers(1, 4))):
        p0, p1, p2, p3 = rng.uniform(-0.1 * size, 1.1 * size, size=(4, 2))
        curve = (1 - t) ** 3 * p0 + 3 * (1 - t) ** 2 * t * p1 + 3 * (1 - t) * t**2 * p2 + t**3 * p3
        cv2.polylines(canvas, [curve.round().astype(np.int32)], False, 1, _thickness(rng, size), cv2.LINE_8)


def _draw_ring(canvas: np.ndarray, rng: np.random.Generator) -> None:
    """One to three circle or ellipse outlines (rings, hoops)."""
    size = canvas.shape[0]
    for _ in range(int(rng.integers(1, 4))):
        center = tuple(int(v) for v in rng.uniform(0.25 * size, 0.75 * size, size=2))
        axes = tuple(int(v) for v in rng.uniform(0.08 * size, 0.35 * size, size=2))
        angle = float(rng.uniform(0, 180))
        cv2.ellipse(canvas, center, axes, angle, 0, 360, 1, _thickness(rng, size), cv2.LINE_8)


def _draw_fence(canvas: np.ndarray, rng: np.random.Generator) -> None:
    """A grid of thin bars, possibly sheared (fences, nets, window frames)."""
    size = canvas.shape[0]
    x0, y0 = rng.uniform(0.05 * size, 0.3 * size, size=2)
    x1, y1 = rng.uniform(0.7 * size, 0.95 * size, size=2)
    shear = rng.uniform(-0.3, 0.3) * (y1 - y0)
    thickness = _thickness(rng, size)
    for x in np.linspace(x0, x1, int(rng.integers(3, 9))):
        cv2.line(canvas, (round(x), round(y0)), (round(x + shear), round(y1)), 1, thickness, cv2.LINE_8)
    for y in np.linspace(y0, y1, int(rng.integers(2, 6))):
        offset = shear * (y - y0) / max(y1 - y0, 1e-6)
        cv2.line(canvas, (round(x0 + offset), round(y)), (round(x1 + offset), round(y)), 1, thickness, cv2.LINE_8)


def _draw_text(canvas: np.ndarray, rng: np.random.Generator) -> None:
    """A word in thin strokes (cv2's Hershey fonts)."""
    size = canvas.shape[0]
    word = str(rng.choice(_WORDS))
    font = int(rng.choice([cv2.FONT_HERSHEY_SIMPLEX, cv2.FONT_HERSHEY_PLAIN, cv2.FONT_HERSHEY_SCRIPT_SIMPLEX]))
    thickness = _thickness(rng, size)
    (text_width, text_height), _ = cv2.getTextSize(word, font, 1.0, thickness)
    # Scale the word to 50-90% of the image width, then place it fully inside.
    scale = rng.uniform(0.5, 0.9) * size / text_width
    (text_width, text_height), baseline = cv2.getTextSize(word, font, scale, thickness)
    x = int(rng.uniform(0, max(size - text_width, 1)))
    y = int(rng.uniform(text_height, max(size - baseline, text_height + 1)))
    cv2.putText(canvas, word, (x, y), font, scale, 1, thickness, cv2.LINE_8)


_STRUCTURES: dict[str, Callable[[np.ndarray, np.random.Generator], None]] = {
    "wire": _draw_wire,
    "ring": _draw_ring,
    "fence": _draw_fence,
    "text": _draw_text,
}


def _contrasting_color(rng: np.random.Generator, background: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """An RGB colour far from the mean background colour under the mask, so the object is visible."""
    mean = background[mask.astype(bool)].mean(axis=0)
    candidates = rng.uniform(0, 255, size=(16, 3))
    return candidates[np.argmax(np.linalg.norm(candidates - mean, axis=1))]


def thin_structure_sample(
    rng: np.random.Generator,
    size: int = 256,
    kind: str | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """One thin object on a textured background, and its exact mask.

    Args:
        rng: The source of randomness; the same generator state gives the same sample.
        size: Side of the square image in pixels (at least 16).
        kind: One of `STRUCTURE_KINDS` ("wire", "ring", "fence", "text"); drawn from `rng` when `None`.

    Returns:
        `(image, mask)`: `image` is `(size, size, 3)` uint8 RGB; `mask` is `(size, size)` uint8, 1 on the object
        and 0 elsewhere, never empty and never covering the whole image.
    """
    if size < 16:
        raise ValueError(f"size is {size}; thin structures need images of at least 16x16 pixels.")
    if kind is not None and kind not in _STRUCTURES:
        raise ValueError(f"kind is {kind!r}; use one of {STRUCTURE_KINDS} or None for a random one.")
    for _ in range(_MAX_ATTEMPTS):
        structure = kind or str(rng.choice(STRUCTURE_KINDS))
        background = _BACKGROUNDS[str(rng.choice(BACKGROUND_KINDS))](rng, size)
        mask = np.zeros((size, size), dtype=np.uint8)
        _STRUCTURES[structure](mask, rng)
        fraction = mask.mean()
        if MIN_FOREGROUND_FRACTION <= fraction <= MAX_FOREGROUND_FRACTION:
            break
    else:  # pragma: no cover - every structure lands inside the image far more often than 1 in 20 draws
        raise RuntimeError(f"could not draw a {kind or 'thin'} structure that fits a {size}x{size} image.")
    image = background
    image[mask.astype(bool)] = _contrasting_color(rng, background, mask)
    image = image + rng.normal(0, 4, size=image.shape)
    return np.clip(image, 0, 255).round().astype(np.uint8), mask


def thin_structure_records(n: int, size: int = 256, seed: int = 0) -> list["SegmentationRecord"]:
    """`n` thin-structure samples as [`SegmentationRecord`]s (one instance each, no ignore pixels).

    Sample `i` depends only on `(seed, i)`, so `thin_structure_records(10, seed=s)[:5]` equals
    `thin_structure_records(5, seed=s)`.

    Args:
        n: Number of records.
        size: Side of each square image in pixels.
        seed: Seed of the data set.

    Returns:
        `list[SegmentationRecord]` with `name` `"thin-{seed}-{i:05d}"`, an RGB PIL `image` of `size x size`,
        `instances` of shape `(1, size, size)` uint8 (1 object, 0 background) and `subset` `"synthetic"`.
    """
    # Imported here: pasam_hf.data is a separate layer (it imports datasets); sampling alone must not need it.
    from .data.records import SegmentationRecord

    records = []
    for index in range(n):
        image, mask = thin_structure_sample(np.random.default_rng([seed, index]), size)
        records.append(
            SegmentationRecord(
                name=f"thin-{seed}-{index:05d}",
                image=PIL.Image.fromarray(image),
                instances=mask[None],
                subset="synthetic",
            )
        )
    return records


__all__ = ["STRUCTURE_KINDS", "thin_structure_records", "thin_structure_sample"]
