"""Downloads of the page, in the formats the command line writes: a mask as an 8-bit PNG (0 background, 255
foreground, `pasam segment`'s `_mask.png`) and masks as COCO run-length encodings (`pasam generate`'s JSON)."""

from __future__ import annotations

import json
from pathlib import Path
from collections.abc import Sequence

import numpy as np

from ..cli.generate import coco_annotations
from ..cli.segment import mask_image


def write_mask_png(mask: np.ndarray, path: str | Path) -> Path:
    """A boolean `(H, W)` mask as a PNG at `path`; returns the path."""
    path = Path(path)
    # The fastest zlib level: the page writes the mask on every click (a ragged 480 x 854 mask took 20 ms at the
    # default level), and a two-value image stays small at any level.
    mask_image(np.asarray(mask, dtype=bool)).save(path, compress_level=1)
    return path


def write_coco_json(
    masks: Sequence[np.ndarray],
    scores: Sequence[float],
    path: str | Path,
    file_name: str,
    image_size: tuple[int, int],
) -> Path:
    """Masks (boolean `(H, W)`) and their predicted IoUs as `{"image": {...}, "annotations": [...]}` with COCO RLE
    segmentations, as `pasam generate` writes `<stem>_masks.json`; `image_size` is `(H, W)`. Returns the path."""
    path = Path(path)
    masks = [np.asarray(mask, dtype=bool) for mask in masks]
    height, width = image_size
    document = {
        "image": {"file_name": file_name, "height": int(height), "width": int(width)},
        "annotations": coco_annotations(masks, list(scores)),
    }
    path.write_text(json.dumps(document))
    return path


__all__ = ["write_coco_json", "write_mask_png"]
