"""Values of training labels and of `SegmentationRecord.instances`, shared by the data pipeline and the losses.

Hard labels are 1 (foreground), 0 (background) and 255 (void, ignored). Labels resized bilinearly, the release's
convention (reference section 6), are soft: a value in [0, 1] is the pixel's foreground fraction and a soft target
of the losses; 255 is still void. Kept apart from `pasam_hf.data` so that `losses.py`, which the model's remote
code imports, needs no subpackage.
"""

from __future__ import annotations

BACKGROUND = 0
FOREGROUND = 1
IGNORE = 255
# A pixel counts as foreground for prompts, instance checks and the uncertainty target above this value:
# HQSeg-44K's `> 128` on 0..255 masks (and exactly the pixels labelled 1 in hard 0 / 1 / 255 labels).
FOREGROUND_THRESHOLD = 128 / 255


def labelled_pixels(labels):
    """Pixels with a target: labels in [0, 1] (hard 0 / 1, or soft fractions); 255 (void) and any other value are
    ignored. Takes a numpy array or a tensor, returns the same kind (bool)."""
    return (labels >= BACKGROUND) & (labels <= FOREGROUND)


def foreground_pixels(labels):
    """Pixels counted as foreground: labels in `(FOREGROUND_THRESHOLD, 1]`. Numpy array or tensor in, bool out."""
    return (labels > FOREGROUND_THRESHOLD) & (labels <= FOREGROUND)
