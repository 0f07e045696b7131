"""The unit of training data: one image with its instance masks.

Every data source (`datasets` datasets, image/mask folders) yields [`SegmentationRecord`]s; augmentation, prompt
simulation and batching only ever see this one form.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import PIL.Image

# Label values of `SegmentationRecord.instances` and of training `labels` (the losses ignore everything else),
# re-exported here as the data pipeline's names.
from ..labels import (  # noqa: F401
    BACKGROUND,
    FOREGROUND,
    FOREGROUND_THRESHOLD,
    IGNORE,
    foreground_pixels,
    labelled_pixels,
)


@dataclass
class SegmentationRecord:
    """One training image with its instance masks.

    Attributes:
        name (`str`):
            Identifier shown in reports (file stem, or `"<split>[<index>]"` for `datasets` rows).
        image (`PIL.Image.Image`):
            RGB image, already EXIF-transposed, of size `(W, H)`.
        instances (`np.ndarray` of shape `(K, H, W)`, `uint8`):
            One mask per instance: 1 foreground, 0 background, 255 ignore (void). `K` may be 0 when the mask holds
            no foreground; such a record is a bad sample for training.
        subset (`str`, *optional*):
            Name of the sub-folder or sub-dataset the record comes from (e.g. `"DIS-VD"`), `""` when there is none.
    """

    name: str
    image: PIL.Image.Image
    instances: np.ndarray
    subset: str = ""

    def __post_init__(self) -> None:
        if self.instances.ndim != 3:
            raise ValueError(
                f"SegmentationRecord {self.name!r}: instances must have shape (K, H, W), got "
                f"{tuple(self.instances.shape)}; stack single masks with instances[None]."
            )
        if self.instances.dtype != np.uint8:
            raise ValueError(
                f"SegmentationRecord {self.name!r}: instances must be uint8 with values 0/1/255, got dtype "
                f"{self.instances.dtype}; decode masks with pasam_hf.data.decode_mask."
            )
        width, height = self.image.size
        if self.instances.shape[1:] != (height, width):
            raise ValueError(
                f"SegmentationRecord {self.name!r}: masks are {self.instances.shape[2]}x{self.instances.shape[1]} "
                f"(WxH) but the image is {width}x{height}; decode masks with resize_masks=True to resize them."
            )

    @property
    def num_instances(self) -> int:
        """Number of instance masks `K`."""
        return int(self.instances.shape[0])
