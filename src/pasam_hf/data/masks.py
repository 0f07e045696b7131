"""Decoding of segmentation masks of any common kind into instance masks `(K, H, W)` with 1 / 0 / 255.

Supported encodings (`mask_format`):

- `"labels"`: an integer label map. 0 is background, `void_value` is ignored, every other value is an object.
  Palette PNGs (PIL mode `"P"`, e.g. DAVIS) are always read as their palette *indices*, never their colours. 0/1
  masks are label maps with one object.
- `"threshold"`: a grey-level mask (0/255 masks, anti-aliased or JPEG-compressed ones): foreground is `> 128`, the
  HQSeg-44K protocol. Floats in [0, 1] use `> 0.5`.
- `"trimap"`: 0 background, 255 foreground, 128 ignore (e.g. the hq-fixture masks).
- `"auto"` (default) picks one from the mask itself, see [`detect_mask_format`].

`instance_mode="binary"` merges all objects into one mask; `"split"` gives one mask per distinct object value.
Instances without any foreground pixel are dropped, so `K` may be 0 (such a sample is unusable for training).
"""

from __future__ import annotations

import io
import os
from typing import Any, Literal

import cv2
import numpy as np
import PIL.Image
import PIL.ImageOps
import torch
import torch.nn.functional as F

from .records import FOREGROUND, IGNORE

MaskFormat = Literal["auto", "labels", "threshold", "trimap"]
InstanceMode = Literal["binary", "split"]
MASK_FORMATS = ("auto", "labels", "threshold", "trimap")
INSTANCE_MODES = ("binary", "split")
# HQSeg-44K protocol: foreground is GT > 128 on 0..255 masks.
THRESHOLD = 128
TRIMAP_IGNORE = 128
# Colour masks: label of a non-black colour = this | r << 16 | g << 8 | b, above every grey level and void value.
COLOUR_LABEL_BASE = 1 << 24
# cv2.resize handles at most this many channels at once.
_CV2_MAX_CHANNELS = 512


class MaskDecodeError(ValueError):
    """A mask cannot be read or does not fit its image."""


class MaskSizeError(MaskDecodeError):
    """A mask whose size differs from its image's; `option` is how the message names the setting that resizes it
    (`resize_masks=True` in Python, `--resize-masks` on the `pasam` command line)."""

    def __init__(
        self, name: str, mask_size: tuple[int, int], image_size: tuple[int, int], option: str = "resize_masks=True"
    ):
        self.name, self.mask_size, self.image_size = name, mask_size, image_size
        super().__init__(
            f"{name} is {mask_size[0]}x{mask_size[1]} (WxH) but its image is {image_size[0]}x{image_size[1]}; fix "
            f"the mask, or pass {option} to resize masks to their image (nearest neighbour)."
        )

    def naming(self, option: str) -> MaskSizeError:
        """The same error, its message naming `option`."""
        return MaskSizeError(self.name, self.mask_size, self.image_size, option)


def load_mask_array(mask: Any, name: str = "mask") -> np.ndarray:
    """Read a mask of any kind as a 2-D array, keeping palette indices and the raw values of wide modes.

    Args:
        mask: A path, raw file bytes, a `{"bytes": ..., "path": ...}` dict (a `datasets.Image(decode=False)` cell),
            a PIL image, a numpy array or a torch tensor of shape `(H, W)`, `(H, W, C)` or `(1, H, W)`.
        name: How error messages call the mask.

    Returns:
        `np.ndarray` of shape `(H, W)`: integers, bool or floats. Colour masks whose channels are equal are read as
        grey; other colour masks become one integer per colour, `COLOUR_LABEL_BASE | r << 16 | g << 8 | b` (black
        = 0): at least 2**24, so no colour reads as a grey level or as the void value (pure blue is not 255).
    """
    if isinstance(mask, (str, os.PathLike, bytes, bytearray, dict)):
        mask = open_image_source(mask, name)
    if isinstance(mask, PIL.Image.Image):
        if mask.getexif().get(0x0112, 1) not in (1, None):
            mask = PIL.ImageOps.exif_transpose(mask)
        # Palette images: np.asarray gives the indices, which is what palette masks encode.
        if mask.mode in ("RGBA", "LA", "PA"):
            mask = mask.convert("RGB" if mask.mode == "RGBA" else "L" if mask.mode == "LA" else "P")
        array = np.asarray(mask)
    elif torch.is_tensor(mask):
        array = mask.detach().cpu().numpy()
    elif isinstance(mask, np.ndarray):
        array = mask
    else:
        raise MaskDecodeError(
            f"{name} is a {type(mask).__name__}; pass a path, file bytes, a PIL image, a numpy array or a tensor."
        )
    if array.ndim == 3 and 1 in (array.shape[0], array.shape[-1]):
        array = array.reshape(array.shape[1:] if array.shape[0] == 1 else array.shape[:2])
    if array.ndim == 3 and array.shape[-1] in (3, 4):
        rgb = array[..., :3]
        if (rgb == rgb[..., :1]).all():
            array = rgb[..., 0]
        else:
            rgb = rgb.astype(np.int64)
            array = (rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2]
            array = np.where(array > 0, array | COLOUR_LABEL_BASE, 0)
    if array.ndim != 2:
        raise MaskDecodeError(
            f"{name} has shape {tuple(array.shape)}; a mask is one 2-D map (H, W) (stack several objects as one "
            "label map, or one file per image)."
        )
    if array.size == 0:
        raise MaskDecodeError(f"{name} is empty (shape {tuple(array.shape)}).")
    if np.issubdtype(array.dtype, np.floating) and not np.isfinite(array).all():
        raise MaskDecodeError(f"{name} contains NaN or infinite values; masks hold labels or values in [0, 1].")
    return array


def detect_mask_format(array: np.ndarray, void_value: int | None = 255, is_palette: bool = False) -> str:
    """The encoding `"auto"` resolves to for a mask array.

    Rules, in order: palette images and bool arrays are `"labels"`; floats are `"threshold"`; integer masks with
    values above 255 (colour masks read by [`load_mask_array`], 16-bit instance maps) are `"labels"`: grey levels
    of an 8-bit mask never get there; integer masks whose values are within {0, 128, 255} and contain 128 are
    `"trimap"`; within {0, 255}: `"threshold"`; masks whose values other than 0 and `void_value` are all below
    128 (0/1 masks, label maps, DAVIS with void 255) are `"labels"`; anything else (grey levels reaching above
    128, e.g. JPEG masks) is `"threshold"`.
    """
    if is_palette or array.dtype == bool:
        return "labels"
    if np.issubdtype(array.dtype, np.floating):
        return "threshold"
    values = np.unique(array)
    if values[-1] > 255:
        return "labels"
    value_set = set(values.tolist())
    if TRIMAP_IGNORE in value_set and value_set <= {0, TRIMAP_IGNORE, 255}:
        return "trimap"
    if value_set <= {0, 255}:
        return "threshold"
    objects = values[(values != 0) & (values != (void_value if void_value is not None else -1))]
    if objects.size == 0 or objects.max() < THRESHOLD:
        return "labels"
    return "threshold"


def resize_mask_nearest(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resize of `(H, W)` or `(K, H, W)` masks to `size = (height, width)` with cv2.

    Label values are never blended. Returns the same layout at the new size."""
    height, width = size
    if mask.ndim == 2:
        return _resize_channels(mask[..., None], width, height)[..., 0]
    if mask.shape[0] == 0:
        return np.zeros((0, height, width), dtype=mask.dtype)
    channels_last = np.ascontiguousarray(mask.transpose(1, 2, 0))
    chunks = [
        _resize_channels(channels_last[..., start : start + _CV2_MAX_CHANNELS], width, height)
        for start in range(0, channels_last.shape[-1], _CV2_MAX_CHANNELS)
    ]
    return np.concatenate(chunks, axis=-1).transpose(2, 0, 1)


def resize_labels_bilinear(masks: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of `(K, H, W)` instance masks (1 / 0 / 255) to soft labels, the release's convention.

    The release resizes its 0..255 masks with `torch.nn.functional.interpolate` (bilinear, `align_corners=False`,
    no antialias) and trains on `label / 255`, so pixels at object edges are fractional soft targets (reference
    section 6). Here the foreground indicator is resized the same way; a pixel whose bilinear sample reads any void
    pixel (255) stays void (255), since its target would be partly unknown.

    Returns:
        `np.ndarray` of shape `(K, *size)`, float32: values in [0, 1], or 255 where ignored.
    """
    height, width = size
    if masks.shape[0] == 0:
        return np.zeros((0, height, width), dtype=np.float32)
    labels = torch.from_numpy(np.ascontiguousarray(masks))
    foreground = (labels == FOREGROUND).float()
    void = labels == IGNORE
    if tuple(masks.shape[1:]) != (height, width):
        resize = dict(size=(height, width), mode="bilinear", align_corners=False, antialias=False)
        foreground = F.interpolate(foreground[None], **resize)[0]
        void = F.interpolate(void[None].float(), **resize)[0] > 0
    return foreground.masked_fill(void, float(IGNORE)).numpy()


def _resize_channels(array: np.ndarray, width: int, height: int) -> np.ndarray:
    """cv2 nearest resize of `(H, W, C)`, keeping the channel axis when `C == 1` (cv2 drops it)."""
    dtype = array.dtype
    # cv2 has no int64/bool resize; label maps from colour masks need 32 bits.
    work = array.astype(np.int32) if dtype in (np.int64, np.uint32, np.bool_) else array
    resized = cv2.resize(work, (width, height), interpolation=cv2.INTER_NEAREST)
    return resized.reshape(height, width, array.shape[-1]).astype(dtype, copy=False)


def decode_mask(
    mask: Any,
    *,
    image_size: tuple[int, int] | None = None,
    mask_format: MaskFormat = "auto",
    void_value: int | None = 255,
    instance_mode: InstanceMode = "binary",
    resize_masks: bool = False,
    name: str = "mask",
) -> np.ndarray:
    """Decode one mask into instance masks for training.

    Args:
        mask: Anything [`load_mask_array`] reads.
        image_size (`tuple[int, int]`, *optional*):
            `(width, height)` of the image (PIL's `image.size`). A mask of another size raises, or is resized with
            nearest neighbour when `resize_masks=True`.
        mask_format (`str`, *optional*, defaults to `"auto"`): `"auto"`, `"labels"`, `"threshold"` or `"trimap"`.
        void_value (`int`, *optional*, defaults to 255):
            Label-map value to ignore (DAVIS and VOC borders). `None` when the label maps have none. Not used by
            `"threshold"` masks, where 255 is foreground.
        instance_mode (`str`, *optional*, defaults to `"binary"`):
            `"binary"`: every object value is foreground of one mask; `"split"`: one mask per distinct object value
            (label maps only; a threshold or trimap mask has a single object).
        resize_masks (`bool`, *optional*, defaults to `False`): resize masks whose size differs from the image.
        name: How error messages call the mask (e.g. its file name).

    Returns:
        `np.ndarray` of shape `(K, H, W)`, uint8: 1 foreground, 0 background, 255 ignore. Instances without
        foreground are left out, so `K` is 0 for an empty mask.
    """
    if mask_format not in MASK_FORMATS:
        raise ValueError(f"mask_format={mask_format!r} is not one of {MASK_FORMATS}.")
    if instance_mode not in INSTANCE_MODES:
        raise ValueError(f"instance_mode={instance_mode!r} is not one of {INSTANCE_MODES}.")
    if isinstance(mask, (str, os.PathLike, bytes, bytearray, dict)):
        # Opened here rather than in load_mask_array to learn whether it is a palette image.
        mask = open_image_source(mask, name)
    is_palette = isinstance(mask, PIL.Image.Image) and mask.mode in ("P", "PA")
    array = load_mask_array(mask, name)

    if image_size is not None:
        width, height = image_size
        if array.shape != (height, width):
            if not resize_masks:
                raise MaskSizeError(name, (array.shape[1], array.shape[0]), (width, height))
            array = resize_mask_nearest(array, (height, width))

    kind = detect_mask_format(array, void_value, is_palette) if mask_format == "auto" else mask_format
    if kind == "threshold":
        foreground = array > (0.5 if np.issubdtype(array.dtype, np.floating) else THRESHOLD)
        return _single_instance(foreground, None)
    if kind == "trimap":
        return _single_instance(array == 255, array == TRIMAP_IGNORE)
    if np.issubdtype(array.dtype, np.floating):
        raise MaskDecodeError(
            f"{name} holds floats, which are not labels; use mask_format='threshold' (foreground > 0.5) or store "
            "integer labels."
        )
    void = array == void_value if void_value is not None else np.zeros(array.shape, dtype=bool)
    objects = (array != 0) & ~void
    if instance_mode == "binary":
        return _single_instance(objects, void)
    values = np.unique(array[objects])
    if values.size == 0:
        return np.zeros((0, *array.shape), dtype=np.uint8)
    # (K, H, W) in one broadcast: each object value against the map.
    instances = (array[None] == values[:, None, None]).astype(np.uint8)
    instances[:, void] = IGNORE
    return instances


def open_image_source(source: Any, name: str) -> PIL.Image.Image:
    """Open a path, file bytes or `{"bytes", "path"}` dict (a `datasets.Image(decode=False)` cell) as a PIL image,
    without converting its mode (palette indices stay indices)."""
    if isinstance(source, dict):
        source = source.get("bytes") if source.get("bytes") is not None else source.get("path")
        if source is None:
            raise MaskDecodeError(f"{name} is a dict without 'bytes' or 'path'; pass an image, a path or file bytes.")
    if isinstance(source, (bytes, bytearray)):
        return _read_pil(io.BytesIO(source), name)
    if not os.path.isfile(source):
        raise MaskDecodeError(f"{name} is the path {str(source)!r}, which is not a file; check the path.")
    return _read_pil(source, name)


def _read_pil(source: Any, name: str) -> PIL.Image.Image:
    try:
        with PIL.Image.open(source) as opened:
            opened.load()
            return opened.copy()
    except (OSError, SyntaxError, ValueError) as error:
        raise MaskDecodeError(
            f"{name} cannot be read as an image ({error}); the file is corrupt, truncated or not an image: "
            "re-export it as PNG."
        ) from error


def _single_instance(foreground: np.ndarray, ignore: np.ndarray | None) -> np.ndarray:
    """`(H, W)` bool foreground (+ ignore) -> `(1, H, W)` uint8, or `(0, H, W)` when there is no foreground."""
    if not foreground.any():
        return np.zeros((0, *foreground.shape), dtype=np.uint8)
    instance = foreground.astype(np.uint8) * FOREGROUND
    if ignore is not None:
        instance[ignore & ~foreground] = IGNORE
    return instance[None]


__all__ = [
    "INSTANCE_MODES",
    "MASK_FORMATS",
    "MaskDecodeError",
    "MaskSizeError",
    "decode_mask",
    "detect_mask_format",
    "load_mask_array",
    "open_image_source",
    "resize_labels_bilinear",
    "resize_mask_nearest",
]
