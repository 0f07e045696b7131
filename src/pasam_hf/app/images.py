"""Images for the page: uploads read defensively, and the example pictures the project draws itself.

An upload can be anything a browser sends: a text file named `.png`, a truncated JPEG, a 20000 x 20000 scan. Every
problem becomes an [`AppInputError`] whose message the page shows; nothing here may take the server down. Large
images are downscaled (the model sees at most 1024 pixels per side anyway; the page works at `max_side`), and those
that would not even fit in memory decoded are refused before their pixels are read.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import PIL.Image

from ..validation import to_rgb_uint8
from .engine import AppInputError

# The page works on images of at most this many pixels per side: masks come from 256 x 256 logits, so a larger
# picture only costs transfer, drawing and memory.
MAX_SIDE = 2048
# Images with more pixels than this are refused before decoding (about 300 MB as RGB).
MAX_PIXELS = 100_000_000


@dataclass
class LoadedImage:
    """An upload as the page uses it: `image` `(H, W, 3)` uint8 RGB, a `name` for downloads, and a `note` when
    the image was changed (downscaled)."""

    image: np.ndarray
    name: str
    note: str | None = None


def _stem(name: str) -> str:
    stem = Path(name).stem or "image"
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in stem)[:64]


def downscale(
    image: np.ndarray, max_side: int = MAX_SIDE, original_size: tuple[int, int] | None = None
) -> tuple[np.ndarray, str | None]:
    """`image` with its longest side at most `max_side` (area interpolation), and a note when it was resized.

    `original_size` `(width, height)` names the file's size in the note when `image` was already decoded smaller.
    """
    height, width = image.shape[:2]
    original_width, original_height = original_size or (width, height)
    if max(height, width) <= max_side and (original_width, original_height) == (width, height):
        return image, None
    scale = min(1.0, max_side / max(height, width))
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    resized = cv2.resize(image, size, interpolation=cv2.INTER_AREA) if scale < 1 else image
    return resized, (
        f"The image is {original_width}x{original_height} pixels; the page works on it downscaled to "
        f"{size[0]}x{size[1]} (the model sees at most 1024 per side). For masks at full resolution use "
        "`pasam segment`."
    )


def read_upload(path: str | os.PathLike, max_side: int = MAX_SIDE, max_pixels: int = MAX_PIXELS) -> LoadedImage:
    """Read an uploaded file as an RGB image for the page.

    Raises:
        AppInputError: the file is not an image PIL can read, is corrupt, or has more than `max_pixels` pixels.
    """
    path = Path(path)
    name = path.name
    drafted = False
    try:
        with warnings.catch_warnings():
            # Size is checked below, against the page's own limit, before any pixel is decoded.
            warnings.simplefilter("ignore", PIL.Image.DecompressionBombWarning)
            with PIL.Image.open(path) as opened:
                width, height = opened.size
                if width * height > max_pixels:
                    raise AppInputError(
                        f"{name} is {width}x{height} pixels ({width * height / 1e6:.0f} megapixels); the page takes "
                        f"up to {max_pixels / 1e6:.0f} megapixels. Downscale it first (the model sees at most 1024 "
                        "pixels per side)."
                    )
                if opened.format == "JPEG" and max(width, height) > 2 * max_side:
                    # JPEG decodes at 1/2, 1/4 or 1/8 scale directly: no full-size copy for large photos.
                    longest = max(width, height)
                    target = (width * max_side // longest, height * max_side // longest)
                    drafted = opened.draft("RGB", target) is not None
                opened.load()
                image = to_rgb_uint8(opened, name=name)
    except AppInputError:
        raise
    except PIL.Image.DecompressionBombError as error:
        raise AppInputError(
            f"{name} is larger than an image may be ({error}); downscale it first."
        ) from error
    except (OSError, SyntaxError, ValueError, PIL.UnidentifiedImageError) as error:
        raise AppInputError(
            f"{name} is not an image the page can read ({' '.join(str(error).split())}). Upload a PNG, JPEG, WebP, "
            "BMP or TIFF picture."
        ) from error
    image, note = downscale(np.ascontiguousarray(image), max_side, original_size=(width, height) if drafted else None)
    return LoadedImage(image=image, name=_stem(name), note=note)


def read_array(image: np.ndarray, name: str = "image", max_side: int = MAX_SIDE) -> LoadedImage:
    """An in-memory image (an example, or what a caller passes) as the page uses it."""
    try:
        array = to_rgb_uint8(image, name=name)
    except ValueError as error:
        raise AppInputError(" ".join(str(error).split())) from error
    array, note = downscale(np.ascontiguousarray(array), max_side)
    return LoadedImage(image=array, name=_stem(name), note=note)


def example_images() -> dict[str, np.ndarray]:
    """The page's example pictures, drawn procedurally (no third-party photos): thin structures, PA-SAM's case,
    and a scene of plain shapes. The same pictures on every call."""
    from ..benchmarking import synthetic_photo
    from ..synthetic import STRUCTURE_KINDS, thin_structure_sample

    tiles = [thin_structure_sample(np.random.default_rng([7, index]), 320, kind)[0]
             for index, kind in enumerate(STRUCTURE_KINDS)]
    mosaic = np.vstack([np.hstack(tiles[:2]), np.hstack(tiles[2:4])])
    return {
        "thin structures": mosaic,
        "shapes": synthetic_photo(480, 720, seed=3),
    }


__all__ = ["MAX_PIXELS", "MAX_SIDE", "LoadedImage", "downscale", "example_images", "read_array", "read_upload"]
