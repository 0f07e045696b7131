"""Training data for PA-SAM: sources, mask decoding, augmentation, prompt simulation, batching.

See `docs/data.md`.
"""

from .records import BACKGROUND, FOREGROUND, IGNORE, SegmentationRecord

__all__ = ["BACKGROUND", "FOREGROUND", "IGNORE", "SegmentationRecord"]
