"""Input checks shared by [`PASamProcessor`], [`PASamImageProcessor`] and the inference helpers.

Images of any common kind are brought to one form, an RGB `uint8` array of shape `(height, width, 3)`, before SAM's
preprocessing sees them; prompts are checked against the image they belong to. Anything that cannot be turned into
a correct input raises a `ValueError` that names the input (`images[2]`, `input_boxes[0][1]`), what is wrong with
it and how to fix it. The guarantees are listed in `docs/reliability.md`.

Why normalise before SAM's preprocessing: transformers rescales every image by 1/255 and guesses the channel axis,
so a float image in [0, 1] or a `uint16` image would come out silently wrong, a `(1, 1, 3)` array would be read as
a 1x3 one-channel image, and NaNs would flow into the model.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import PIL.Image
import PIL.ImageOps
import torch
from transformers.image_transforms import convert_to_rgb
from transformers.image_utils import ChannelDimension

# Colour channels an array may carry: grayscale, RGB, RGBA (alpha is composited onto white, as transformers does).
SUPPORTED_CHANNELS = (1, 3, 4)
# Point labels the SAM prompt encoder understands: 1 foreground, 0 background, -1 "not a point", -10 padding.
POINT_LABELS = (1, 0, -1, -10)
DEFAULT_POINT_PAD_VALUE = -10
# Boxes narrower than this (in pixels) have no area to speak of and may collapse to zero width in float32.
MIN_BOX_SIDE = 0.01
# Large images are converted in bands of rows so that no full-size float copy is ever made.
_BAND_ELEMENTS = 1 << 22
# PIL modes whose pixels do not fit in 8 bits: read them as arrays so that their range is not clipped to 255.
_WIDE_PIL_MODES = ("I", "F")

IMAGE_KINDS = (
    "a PIL image, a numpy array of shape (H, W), (H, W, C) or (C, H, W), a torch tensor of shape (C, H, W), "
    "(H, W) or (H, W, C), or the path of an image file"
)


class PromptClippedWarning(UserWarning):
    """A box reached outside its image and was clipped to the image."""


@dataclass(frozen=True)
class Prompts:
    """Checked prompts of a batch, in original-image pixel coordinates, padded to a common shape.

    Attributes:
        points (`np.ndarray` of shape `(batch_size, num_prompts, num_points, 2)`, float64, or `None`):
            `[x, y]` per point; padded points carry the pad value as coordinates.
        labels (`np.ndarray` of shape `(batch_size, num_prompts, num_points)`, int64, or `None`):
            1 foreground, 0 background, -1 not a point, pad value for padding. Given whenever `points` is.
        boxes (`np.ndarray` of shape `(batch_size, num_prompts, 4)`, float64, or `None`):
            `[x0, y0, x1, y1]` per box, clipped to the image.
    """

    points: np.ndarray | None = None
    labels: np.ndarray | None = None
    boxes: np.ndarray | None = None


# --------------------------------------------------------------------------------------------------------- images


def _resolve_data_format(data_format: str | ChannelDimension | None) -> ChannelDimension | None:
    if data_format is None:
        return None
    try:
        return ChannelDimension(data_format)
    except ValueError:
        raise ValueError(
            f"input_data_format={data_format!r} is not a channel layout; use 'channels_first' for (C, H, W) "
            "images, 'channels_last' for (H, W, C), or leave it unset to let the library decide."
        ) from None


def _load_image_file(path: str | os.PathLike, name: str) -> PIL.Image.Image:
    if not os.path.isfile(path):
        raise ValueError(f"{name} is the path {str(path)!r}, which is not a file; check the path.")
    try:
        with PIL.Image.open(path) as opened:
            opened.load()
            return opened.copy()
    except PIL.Image.DecompressionBombError as error:
        raise ValueError(
            f"{name} ({str(path)!r}) is larger than PIL allows ({error}); if you trust the file, raise "
            "PIL.Image.MAX_IMAGE_PIXELS, or downscale the image first."
        ) from error
    except (OSError, SyntaxError, ValueError) as error:
        raise ValueError(
            f"{name} ({str(path)!r}) cannot be read as an image ({error}); the file is corrupt, truncated or not "
            "an image: re-export it as PNG or JPEG."
        ) from error


def _upright_pil(image: PIL.Image.Image, name: str) -> tuple[np.ndarray, bool]:
    """Apply the EXIF orientation; return the pixels and whether they are already RGB uint8 `(H, W, 3)` (they are
    not for modes wider than 8 bits, whose raw values are returned)."""
    try:
        # Only transpose when the tag asks for it: exif_transpose copies the image even when nothing changes.
        if image.getexif().get(0x0112, 1) not in (1, None):
            image = PIL.ImageOps.exif_transpose(image)
        if image.mode.startswith(_WIDE_PIL_MODES):
            array = np.asarray(image)
            # Mode "I" is how PIL opens 16-bit PNGs: keep the 16-bit meaning of its values.
            if image.mode == "I" and array.size and array.min() >= 0 and array.max() <= np.iinfo(np.uint16).max:
                array = array.astype(np.uint16)
            return array, False
        return convert_to_rgb(image, return_numpy=True), True
    except OSError as error:
        raise ValueError(
            f"{name} is a PIL image whose pixels cannot be decoded ({error}); the file is corrupt or truncated: "
            "re-export it as PNG or JPEG."
        ) from error
    except ValueError as error:  # a mode PIL cannot convert to RGB
        raise ValueError(
            f"{name} is a PIL image in mode {image.mode!r}, which PIL cannot convert to RGB ({error}); convert it "
            "to RGB yourself first."
        ) from error


def _as_numpy(image: torch.Tensor | np.ndarray, name: str) -> np.ndarray:
    if isinstance(image, np.ndarray):
        return image
    tensor = image.detach()
    if tensor.is_complex():
        raise ValueError(f"{name} is a complex tensor; pass real pixel values.")
    if tensor.dtype == torch.bfloat16:  # numpy has no bfloat16
        tensor = tensor.float()
    return tensor.cpu().numpy()


def _channels_last(
    array: np.ndarray, name: str, data_format: ChannelDimension | None, prefer_first: bool
) -> np.ndarray:
    """`array` as `(H, W)` or `(H, W, C)`; `prefer_first` breaks ties ((3, 5, 3)) for torch tensors, which are CHW."""
    if array.ndim == 2:
        return array
    if array.ndim != 3:
        raise ValueError(
            f"{name} has shape {array.shape}; an image has 2 or 3 dimensions ((H, W), (H, W, C) or (C, H, W)). "
            "Pass a batch as a list of images or a 4-D array (N, H, W, C)."
        )
    first_ok, last_ok = array.shape[0] in SUPPORTED_CHANNELS, array.shape[-1] in SUPPORTED_CHANNELS
    if data_format == ChannelDimension.FIRST or (data_format is None and first_ok and (prefer_first or not last_ok)):
        if not first_ok:
            raise ValueError(
                f"{name} has shape {array.shape} but input_data_format says channels come first; "
                f"images have {SUPPORTED_CHANNELS} channels. Fix input_data_format or the array."
            )
        return np.moveaxis(array, 0, -1)
    if data_format == ChannelDimension.LAST or last_ok:
        if not last_ok:
            raise ValueError(
                f"{name} has shape {array.shape} but input_data_format says channels come last; "
                f"images have {SUPPORTED_CHANNELS} channels. Fix input_data_format or the array."
            )
        return array
    raise ValueError(
        f"{name} has shape {array.shape}: neither its first nor its last axis holds 1, 3 or 4 colour channels. "
        "Pass grayscale (H, W), RGB or RGBA as (H, W, C) or (C, H, W); convert other channel counts to RGB first."
    )


def _to_uint8(array: np.ndarray, name: str) -> np.ndarray:
    """Pixel values of any real dtype as uint8 in [0, 255]; the dtype, not the content, says what the range is,
    except for floats ([0, 1] or [0, 255]) and integers other than uint16 (which must already lie in [0, 255])."""
    if not array.dtype.isnative:  # big-endian data, e.g. PIL's "I;16B"
        array = array.astype(array.dtype.newbyteorder("="))
    if array.dtype == np.uint8:
        return array
    if array.dtype == np.bool_:
        return array.view(np.uint8) * np.uint8(255)
    kind = array.dtype.kind
    if kind not in "uif":
        raise ValueError(
            f"{name} has dtype {array.dtype}, which is not a pixel type; pass uint8, uint16, bool or float pixels."
        )
    if array.size == 0:
        raise ValueError(f"{name} has shape {array.shape}, which holds no pixels; pass an image of at least 1x1.")
    if kind == "f":
        finite = all(np.isfinite(array[start:start + step]).all() for start, step in _row_slices(array))
        if not finite:
            raise ValueError(f"{name} contains NaN or infinite values; fix or drop the image.")
    low, high = array.min(), array.max()
    if array.dtype == np.uint16:
        scale = 255.0 / 65535.0  # 16-bit images use the whole range (16-bit PNG/TIFF).
    elif kind == "f" and low >= 0 and high <= 1:
        scale = 255.0
    elif low >= 0 and high <= 255:
        scale = 1.0
    else:
        raise ValueError(
            f"{name} has dtype {array.dtype} and values in [{low}, {high}]: neither [0, 1] nor [0, 255]. Pass the "
            "raw image (uint8, uint16, or float in [0, 1] or [0, 255]); pixel values already normalised with a "
            "mean and std are not accepted, since the processor normalises them itself."
        )
    out = np.empty(array.shape, dtype=np.uint8)
    work_dtype = np.float32 if array.itemsize <= 2 or array.dtype == np.float32 else np.float64
    for start, step in _row_slices(array):
        # One temporary per band, scaled and rounded in place.
        band = array[start:start + step].astype(work_dtype)
        np.multiply(band, scale, out=band)
        np.rint(band, out=band)
        out[start:start + step] = band
    return out


def _row_slices(array: np.ndarray) -> list[tuple[int, int]]:
    channels = array.shape[2] if array.ndim == 3 else 1
    rows = max(1, _BAND_ELEMENTS // max(1, array.shape[1] * channels)) if array.ndim >= 2 else array.shape[0]
    return [(start, rows) for start in range(0, array.shape[0], rows)]


def _to_rgb(array: np.ndarray) -> np.ndarray:
    """uint8 `(H, W)` or `(H, W, C)` with C in `SUPPORTED_CHANNELS` (checked by `_channels_last`) as `(H, W, 3)`."""
    if array.ndim == 2:
        array = array[..., None]
    if array.shape[-1] == 3:
        return array
    if array.shape[-1] == 1:
        return np.repeat(array, 3, axis=-1)
    # RGBA: transformers' own conversion (alpha composited onto white), a band at a time to bound its float copy.
    out = np.empty(array.shape[:2] + (3,), dtype=np.uint8)
    for start, step in _row_slices(array):
        band = array[start:start + step]
        out[start:start + step] = convert_to_rgb(band, return_numpy=True, input_data_format=ChannelDimension.LAST)
    return out


def to_rgb_uint8(
    image: Any,
    name: str = "image",
    data_format: str | ChannelDimension | None = None,
) -> np.ndarray:
    """One image of any supported kind as an upright RGB uint8 array.

    Args:
        image: A PIL image (any mode; EXIF orientation applied; palette, grayscale, CMYK converted; alpha composited
            onto white), a numpy array (`(H, W)`, `(H, W, C)` or `(C, H, W)`), a torch tensor (`(C, H, W)`,
            `(H, W)` or `(H, W, C)`) or a path to an image file. Arrays may be uint8, uint16 (full 16-bit range),
            bool, other integers with values in [0, 255], or floats in [0, 1] or [0, 255].
        name: How error messages call the input, e.g. `"images[3]"`.
        data_format: Channel layout of arrays (`"channels_first"` / `"channels_last"`); guessed when `None`:
            the axis of size 1, 3 or 4, the last one for numpy arrays and the first one for tensors when both fit.

    Returns:
        `np.ndarray` of shape `(height, width, 3)` and dtype uint8 (a view of the input when it already is one).

    Raises:
        ValueError: naming `name`, the problem and the fix, for anything that is not such an image.
    """
    layout = _resolve_data_format(data_format)
    if isinstance(image, (str, os.PathLike)):
        image = _load_image_file(image, name)
    if isinstance(image, PIL.Image.Image):
        if image.width == 0 or image.height == 0:
            raise ValueError(f"{name} is an empty {image.width}x{image.height} image; pass an image of at least 1x1.")
        array, is_rgb = _upright_pil(image, name)
        if is_rgb:
            return array
        layout, prefer_first = ChannelDimension.LAST, False
    elif isinstance(image, (np.ndarray, torch.Tensor)):
        array, prefer_first = _as_numpy(image, name), isinstance(image, torch.Tensor)
    else:
        raise ValueError(f"{name} is a {type(image).__name__}; pass {IMAGE_KINDS}.")
    array = _channels_last(array, name, layout, prefer_first)
    if 0 in array.shape:
        raise ValueError(f"{name} has shape {array.shape}, which holds no pixels; pass an image of at least 1x1.")
    return _to_rgb(_to_uint8(array, name))


def check_resizable(height: int, width: int, longest_edge: int, name: str = "image") -> None:
    """Raise if resizing the longest side to `longest_edge` (as SAM does) would leave the other side at 0 pixels."""
    short, long = min(height, width), max(height, width)
    if int(short * longest_edge / long + 0.5) < 1:
        raise ValueError(
            f"{name} is {height}x{width} pixels: resizing its longest side to {longest_edge} would make the other "
            f"side 0 pixels. Crop or pad it to an aspect ratio below {2 * longest_edge}:1."
        )


def _as_image_list(images: Any) -> list:
    if images is None:
        raise ValueError(f"images is required: pass {IMAGE_KINDS}, or a list of them.")
    if isinstance(images, (np.ndarray, torch.Tensor)):
        if images.ndim == 4:  # a batch (N, H, W, C) or (N, C, H, W)
            return list(images)
        return [images]
    if isinstance(images, (list, tuple)):
        if not images:
            raise ValueError(f"images is an empty list; pass at least one image ({IMAGE_KINDS}).")
        return list(images)
    return [images]


def _check_rgb(image: Any, name: str, data_format: ChannelDimension | None) -> None:
    """With `do_convert_rgb=False` every image must already be RGB: PA-SAM cannot use other channel counts."""
    if isinstance(image, PIL.Image.Image):
        channels = len(image.getbands())
    elif isinstance(image, (np.ndarray, torch.Tensor)):
        array = _channels_last(_as_numpy(image, name), name, data_format, isinstance(image, torch.Tensor))
        channels = array.shape[2] if array.ndim == 3 else 1
    else:
        return  # paths and other kinds: to_rgb_uint8 names the problem
    if channels != 3:
        raise ValueError(
            f"{name} has {channels} channels and do_convert_rgb=False keeps them, but PA-SAM takes RGB images "
            "(3 channels): its image encoder has 3 input channels and the adapter's edge map is computed from "
            "RGB. Leave do_convert_rgb at its default True (grayscale is repeated to RGB, alpha is composited "
            "onto white), or convert the image to RGB first."
        )


def prepare_images(
    images: Any,
    data_format: str | ChannelDimension | None = None,
    longest_edge: int | None = None,
    convert_rgb: bool = True,
) -> list[np.ndarray]:
    """Every image of a batch through [`to_rgb_uint8`], named `images[i]` in errors.

    Args:
        images: One image, a list of images, or a 4-D array/tensor holding a batch.
        data_format: Channel layout of array inputs, see [`to_rgb_uint8`].
        longest_edge: When given, also reject images too elongated to resize to it ([`check_resizable`]).
        convert_rgb: `False` (`do_convert_rgb=False`) refuses images that are not RGB already, naming the channel
            count, instead of converting them.

    Returns:
        `list[np.ndarray]`, each of shape `(height_i, width_i, 3)`, uint8.
    """
    batch = _as_image_list(images)
    prepared = []
    for index, image in enumerate(batch):
        name = f"images[{index}]"
        if isinstance(image, (list, tuple)):
            raise ValueError(
                f"{name} is a {type(image).__name__}; pass {IMAGE_KINDS} per image (nested lists of images or of "
                "pixel values are not accepted: convert them with np.asarray)."
            )
        if not convert_rgb:
            _check_rgb(image, name, _resolve_data_format(data_format))
        array = to_rgb_uint8(image, name, data_format)
        if longest_edge:
            check_resizable(array.shape[0], array.shape[1], longest_edge, name)
        if not array.flags.writeable:
            # np.asarray(PIL image) is read-only; torch.from_numpy inside transformers would warn about it.
            array = array.copy()
        prepared.append(array)
    return prepared


# -------------------------------------------------------------------------------------------------------- prompts


def _nesting_depth(value: Any, name: str) -> int:
    """Number of list levels above the numbers (`[[1, 2]]` -> 2); strings and other objects are rejected."""
    if isinstance(value, (list, tuple)):
        return 1 + (_nesting_depth(value[0], name) if len(value) else 0)
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.number)):
        raise ValueError(f"{name} contains {value!r} ({type(value).__name__}); prompts hold numbers only.")
    return 0


def _as_nested_list(value: Any, name: str) -> list:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().tolist()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if not isinstance(value, (list, tuple)):
        raise ValueError(f"{name} is a {type(value).__name__}; pass a nested list, a numpy array or a torch tensor.")
    return list(value)


def _numbers(value: Any, name: str, shape_help: str) -> np.ndarray:
    try:
        array = np.asarray(value, dtype=np.float64)
    except (ValueError, TypeError):
        raise ValueError(f"{name} is {value!r}, which is not {shape_help}.") from None
    if not np.isfinite(array).all():
        raise ValueError(f"{name} is {value!r}: prompts must be finite numbers (no NaN or infinity).")
    return array


def _per_image(value: Any, name: str, levels: tuple[int, ...], example: str, num_images: int) -> tuple[list, int]:
    """Split a batched prompt into its images; returns the entries and the depth found (one of `levels`)."""
    entries = _as_nested_list(value, name)
    if not entries:
        raise ValueError(f"{name} is empty; give prompts for each image, e.g. {example}, or leave {name} unset.")
    depth = _nesting_depth(entries, name)
    if depth not in levels:
        raise ValueError(
            f"{name} is nested {depth} levels deep; it must be {' or '.join(map(str, levels))} levels deep, "
            f"[image][...], e.g. {example}."
        )
    if len(entries) != num_images:
        raise ValueError(
            f"{name} has prompts for {len(entries)} images but {num_images} images were given; pass one entry per "
            f"image (several prompts of one image go inside its entry), e.g. {example}."
        )
    for index, entry in enumerate(entries):
        if not isinstance(entry, (list, tuple)) or not entry:
            raise ValueError(f"{name}[{index}] is {entry!r}; every image needs at least one prompt, e.g. {example}.")
        if 1 + _nesting_depth(entry, f"{name}[{index}]") != depth:
            raise ValueError(
                f"{name}[{index}] is nested differently from {name}[0]; use the same structure for every image, "
                f"e.g. {example}."
            )
    return entries, depth


def _check_prompt_counts(counts: dict[str, list[int]]) -> int:
    """The common number of prompts per image of `{"input_points": [per image], "input_boxes": [...]}`."""
    for name, per_image in counts.items():
        if len(set(per_image)) > 1:
            raise ValueError(
                f"{name} gives a different number of prompts per image ({per_image}); the model needs the same number "
                "for every image of a batch. Call the processor once per image, or repeat a prompt to even them out."
            )
    totals = {name: per_image[0] for name, per_image in counts.items()}
    if len(set(totals.values())) > 1:
        raise ValueError(
            f"input_points and input_boxes describe different numbers of prompts per image ({totals}); when both are "
            "given, entry j of each belongs to the same object. Give as many point groups as boxes."
        )
    return next(iter(totals.values()))


def _parse_points(
    input_points: Any, input_labels: Any, num_images: int
) -> tuple[list[list[np.ndarray]], list[list[np.ndarray]] | None]:
    """Per image, per prompt: points `(N, 2)` and labels `(N,)` (labels `None` when not given)."""
    example = "[[[x, y]]] (one point on one image) or [[[[x, y], [x2, y2]]]] (one prompt of two points)"
    entries, depth = _per_image(input_points, "input_points", (3, 4), example, num_images)
    points = []
    for i, entry in enumerate(entries):
        groups = [entry] if depth == 3 else list(entry)
        arrays = []
        for j, group in enumerate(groups):
            name = f"input_points[{i}]" if depth == 3 else f"input_points[{i}][{j}]"
            array = _numbers(group, name, "a list of [x, y] points")
            if array.ndim != 2 or array.shape[1] != 2 or array.shape[0] == 0:
                raise ValueError(f"{name} is {group!r}; a prompt's points are a non-empty list of [x, y] pairs.")
            arrays.append(array)
        points.append(arrays)
    if input_labels is None:
        return points, None
    label_example = "[[1]] (3-level points) or [[[1, 0]]] (4-level points): one label per point"
    label_entries, label_depth = _per_image(input_labels, "input_labels", (depth - 1,), label_example, num_images)
    labels = []
    for i, (entry, point_groups) in enumerate(zip(label_entries, points)):
        groups = [entry] if label_depth == 2 else list(entry)
        if len(groups) != len(point_groups):
            raise ValueError(
                f"input_labels[{i}] has {len(groups)} prompts but input_points[{i}] has {len(point_groups)}; give one "
                "label list per point prompt."
            )
        arrays = []
        for j, (group, point_array) in enumerate(zip(groups, point_groups)):
            name = f"input_labels[{i}]" if label_depth == 2 else f"input_labels[{i}][{j}]"
            array = _numbers(group, name, "a list of point labels")
            if array.ndim != 1 or len(array) != len(point_array):
                raise ValueError(
                    f"{name} has {array.size} labels but its points have {len(point_array)}; give one label per "
                    "point (1 foreground, 0 background)."
                )
            if not np.isin(array, POINT_LABELS).all():
                raise ValueError(
                    f"{name} is {group!r}; point labels are 1 (foreground) or 0 (background) (-1: not a point, "
                    "-10: padding)."
                )
            arrays.append(array.astype(np.int64))
        labels.append(arrays)
    return points, labels


def _parse_boxes(input_boxes: Any, num_images: int) -> list[np.ndarray]:
    """Per image: boxes `(num_boxes, 4)`."""
    example = "[[[x0, y0, x1, y1]]] (one box on one image)"
    entries, _ = _per_image(input_boxes, "input_boxes", (3,), example, num_images)
    boxes = []
    for i, entry in enumerate(entries):
        array = _numbers(entry, f"input_boxes[{i}]", "a list of [x0, y0, x1, y1] boxes")
        if array.ndim != 2 or array.shape[1] != 4:
            raise ValueError(f"input_boxes[{i}] is {entry!r}; each box is [x0, y0, x1, y1] in pixels, e.g. {example}.")
        boxes.append(array)
    return boxes


def _check_points_inside(points: np.ndarray, labels: np.ndarray, height: int, width: int, name: str) -> None:
    real = np.isin(labels, (0, 1))
    outside = real & ((points[:, 0] < 0) | (points[:, 0] > width) | (points[:, 1] < 0) | (points[:, 1] > height))
    if outside.any():
        x, y = points[np.argmax(outside)]
        raise ValueError(
            f"{name} has a point at (x={x:g}, y={y:g}) outside the {width}x{height} (width x height) image; points "
            "are [x, y] pixel coordinates inside the image (check the x/y order and the image they belong to)."
        )


def _checked_box(box: np.ndarray, height: int, width: int, name: str) -> tuple[np.ndarray, bool]:
    x0, y0, x1, y1 = box
    if x1 < x0 or y1 < y0:
        raise ValueError(
            f"{name} is [{x0:g}, {y0:g}, {x1:g}, {y1:g}]: x1 < x0 or y1 < y0. Boxes are [x0, y0, x1, y1] corners in "
            "pixels; convert [x, y, w, h] boxes to [x, y, x + w, y + h]."
        )
    if x1 - x0 < MIN_BOX_SIDE or y1 - y0 < MIN_BOX_SIDE:
        raise ValueError(
            f"{name} is [{x0:g}, {y0:g}, {x1:g}, {y1:g}], which has (almost) zero area: a side is shorter than "
            f"{MIN_BOX_SIDE} pixel. Give a box around the object."
        )
    clipped = np.array([np.clip(x0, 0, width), np.clip(y0, 0, height), np.clip(x1, 0, width), np.clip(y1, 0, height)])
    if clipped[2] - clipped[0] < MIN_BOX_SIDE or clipped[3] - clipped[1] < MIN_BOX_SIDE:
        raise ValueError(
            f"{name} is [{x0:g}, {y0:g}, {x1:g}, {y1:g}], entirely outside the {width}x{height} (width x height) "
            "image (or overlapping it by a sliver); check the coordinates and the image the box belongs to."
        )
    return clipped, not np.array_equal(clipped, box)


def validate_prompts(
    image_sizes: Sequence[tuple[int, int]],
    input_points: Any = None,
    input_labels: Any = None,
    input_boxes: Any = None,
    pad_value: int = DEFAULT_POINT_PAD_VALUE,
) -> Prompts:
    """Check point and box prompts of a batch against its images and bring them to one padded shape.

    Rules (see docs/reliability.md): coordinates must be finite; points must lie inside their image (a point
    outside carries no information about the image, so it is rejected, not moved); boxes must have x0 < x1 and
    y0 < y1; a box partly outside its image is clipped to it with a [`PromptClippedWarning`], one entirely outside
    is rejected; every image needs the same number of prompts (boxes and point groups alike, and as many of each
    when both are given); point groups of different lengths are padded with `pad_value` (label and coordinates),
    which the SAM prompt encoder ignores. Points without labels are foreground (label 1), as in SAM.

    Args:
        image_sizes: `(height, width)` of each image, in pixels.
        input_points: `[image][point][2]` or `[image][prompt][point][2]` (list, numpy array or tensor).
        input_labels: `[image][point]` or `[image][prompt][point]`, matching `input_points`.
        input_boxes: `[image][box][4]`, `[x0, y0, x1, y1]` per box.
        pad_value: Label (and coordinate) of padding points.

    Returns:
        [`Prompts`]: `points` `(batch, num_prompts, num_points, 2)`, `labels` `(batch, num_prompts, num_points)`,
        `boxes` `(batch, num_prompts, 4)`, each `None` when not given.

    Raises:
        ValueError: naming the prompt (e.g. `input_boxes[0][2]`), the problem and the fix.
    """
    num_images = len(image_sizes)
    if input_labels is not None and input_points is None:
        raise ValueError("input_labels were given without input_points; labels belong to points: pass both.")
    counts: dict[str, list[int]] = {}
    points = labels = boxes = None
    if input_points is not None:
        point_groups, label_groups = _parse_points(input_points, input_labels, num_images)
        if label_groups is None:
            label_groups = [[np.ones(len(group), dtype=np.int64) for group in groups] for groups in point_groups]
        counts["input_points"] = [len(groups) for groups in point_groups]
    if input_boxes is not None:
        box_arrays = _parse_boxes(input_boxes, num_images)
        counts["input_boxes"] = [len(array) for array in box_arrays]
    if not counts:
        return Prompts()
    num_prompts = _check_prompt_counts(counts)

    if input_points is not None:
        num_points = max(len(group) for groups in point_groups for group in groups)
        points = np.full((num_images, num_prompts, num_points, 2), float(pad_value))
        labels = np.full((num_images, num_prompts, num_points), pad_value, dtype=np.int64)
        for i, (groups, label_list, (height, width)) in enumerate(zip(point_groups, label_groups, image_sizes)):
            for j, (group, group_labels) in enumerate(zip(groups, label_list)):
                _check_points_inside(group, group_labels, height, width, f"input_points[{i}][{j}]")
                points[i, j, : len(group)] = group
                labels[i, j, : len(group)] = group_labels

    if input_boxes is not None:
        boxes = np.empty((num_images, num_prompts, 4))
        clipped_names = []
        for i, (array, (height, width)) in enumerate(zip(box_arrays, image_sizes)):
            for j, box in enumerate(array):
                boxes[i, j], clipped = _checked_box(box, height, width, f"input_boxes[{i}][{j}]")
                if clipped:
                    clipped_names.append(f"input_boxes[{i}][{j}]")
        if clipped_names:
            warnings.warn(
                f"{', '.join(clipped_names)} reached outside the image and were clipped to it; pass boxes inside the "
                "image to silence this warning.",
                PromptClippedWarning,
                stacklevel=3,
            )
    return Prompts(points=points, labels=labels, boxes=boxes)


__all__ = [
    "IMAGE_KINDS",
    "POINT_LABELS",
    "PromptClippedWarning",
    "Prompts",
    "check_resizable",
    "prepare_images",
    "to_rgb_uint8",
    "validate_prompts",
]
