"""Image processors for PA-SAM: SAM's preprocessing plus the 4-channel adapter input (image + Canny edges).

The adapter input is always derived from SAM's `pixel_values` (normalised, padded to the model's square input),
so the processor and the model's fallback (`PASamModel.forward` without `adapter_pixel_values`) share one code
path and give identical tensors.
"""

from __future__ import annotations

from typing import Sequence

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from transformers.image_processing_utils import BatchFeature
from transformers.image_utils import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, ChannelDimension
from transformers.models.sam.image_processing_pil_sam import SamImageProcessorKwargs, SamImageProcessorPil
from transformers.utils import is_torchvision_available

from .validation import prepare_images

EDGE_MODES = ("official", "rgb")


def wrap_to_uint8(values: torch.Tensor | np.ndarray) -> torch.Tensor | np.ndarray:
    """Cast floats to uint8 the way x86 numpy's unchecked cast does: truncate toward zero, then wrap modulo 256.

    The released PA-SAM weights were trained on edge maps made with that cast (-1.3 -> 255, 2.4 -> 2). ARM numpy
    saturates instead, so the wrap is written out here rather than left to `astype(np.uint8)`. Takes and returns a
    tensor (on its device) or an array.
    """
    if torch.is_tensor(values):
        return torch.from_numpy(wrap_to_uint8(values.detach().float().cpu().numpy())).to(values.device)
    # float -> int32 truncates toward zero, int32 -> uint8 keeps the low byte (wraps modulo 256). Normalised pixels
    # are far inside int32's range; larger magnitudes are reduced first so the cast stays defined.
    values = np.asarray(values, dtype=np.float32)
    if values.size and np.abs(values).max() >= 2**31:
        values = np.fmod(np.trunc(values), 256)
    return values.astype(np.int32).astype(np.uint8)


# Runs on the host (NumPy and OpenCV), so torch.compile runs it outside the graph: `PASamModel` compiled without
# `adapter_pixel_values` breaks its graph here once instead of failing to trace `.numpy()`.
@torch.compiler.disable
def canny_edge_map(
    channels: torch.Tensor,
    edge_mode: str = "official",
    image_mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
    image_std: Sequence[float] = IMAGENET_DEFAULT_STD,
    low_threshold: float = 10.0,
    high_threshold: float = 100.0,
) -> torch.Tensor:
    """Canny edge map of normalised image channels, scaled to [0, 1].

    Args:
        channels (`torch.Tensor` of shape `(batch_size, 3, height, width)`):
            Normalised image channels (SAM preprocessing), already at the adapter resolution.
        edge_mode (`str`):
            `"official"`: Canny on the normalised channels cast with `wrap_to_uint8` (the release's behaviour).
            `"rgb"`: Canny on the de-normalised RGB image rounded to uint8.

    Returns:
        `torch.Tensor` of shape `(batch_size, 1, height, width)`, float32 on the input's device, values in {0, 1}.
    """
    as_uint8 = _edge_input_uint8(channels, edge_mode, image_mean, image_std)
    edges = np.stack([_canny(image, low_threshold, high_threshold) for image in as_uint8])
    # Canny writes 0 or 255: the edge channel is that divided by 255, i.e. exactly 0.0 or 1.0.
    return torch.from_numpy(edges).unsqueeze(1).to(device=channels.device, dtype=torch.float32)


def _edge_input_uint8(
    channels: torch.Tensor | np.ndarray, edge_mode: str, image_mean: Sequence[float], image_std: Sequence[float]
) -> list[np.ndarray]:
    """The uint8 images Canny sees, each `(height, width, 3)` and C-contiguous, from normalised channels
    `(batch_size, 3, height, width)`.

    Computed with NumPy on the host, where Canny runs anyway: these arrays are small (3 x 256 x 256 at most), and
    torch's thread pool costs more than the arithmetic on them (0.42 ms with two threads against 0.11 ms).
    """
    if edge_mode not in EDGE_MODES:
        raise ValueError(f"edge_mode={edge_mode!r} is not supported; use one of {EDGE_MODES}.")
    if torch.is_tensor(channels):
        channels = channels.detach().float().cpu().numpy()
    channels = np.asarray(channels, dtype=np.float32)
    if edge_mode == "official":
        as_uint8 = wrap_to_uint8(channels)
    else:
        mean = np.asarray(image_mean, dtype=np.float32).reshape(1, -1, 1, 1)
        std = np.asarray(image_std, dtype=np.float32).reshape(1, -1, 1, 1)
        as_uint8 = np.clip(np.round((channels * std + mean) * np.float32(255.0)), 0, 255).astype(np.uint8)
    # cv2.merge interleaves the planes about 5x faster than a transposing numpy copy.
    return [cv2.merge(list(planes)) for planes in as_uint8]


def resize_bilinear(pixel_values: torch.Tensor, size: int) -> torch.Tensor:
    """`F.interpolate(pixel_values, (size, size), mode="bilinear", align_corners=False)` (no antialias), float32.

    For the adapter's even integer factor (1024 -> 256) every output pixel is the mean of a 2 x 2 input block
    (sample position `s * i + (s - 1) / 2`, bilinear weights all 1/2), so it is computed from four strided views
    instead of a pass over the whole input: about 8x faster on a CPU. Torch's single-threaded CPU kernel sums
    `a/4 + b/4 + c/4 + d/4` left to right; scaling by a power of two commutes with rounding, so
    `((a + b + c) + d) / 4` is the same float (for normal numbers) in four passes instead of seven. The result is
    that kernel's tensor bit for bit (tested), whatever the thread count (`F.interpolate` itself changes in the last
    bit with the number of threads, and on CUDA). Other sizes use `F.interpolate`.

    Args:
        pixel_values (`torch.Tensor` of shape `(batch_size, C, side, side)`).
        size (`int`): output side.

    Returns:
        `torch.Tensor` of shape `(batch_size, C, size, size)`, float32.
    """
    pixel_values = pixel_values.float()
    scale = _block_scale(pixel_values.shape[-2:], size)
    if scale is None:
        return F.interpolate(pixel_values, size=(size, size), mode="bilinear", align_corners=False)
    return _block_mean(pixel_values, scale)


def _block_scale(shape: Sequence[int], size: int) -> int | None:
    """The factor of the strided 2 x 2 block mean (square input, even integer factor), or None."""
    height, width = shape
    if height != width or height % size or (height // size) % 2:
        return None
    return height // size


def _block_mean(pixel_values: torch.Tensor, scale: int) -> torch.Tensor:
    first = scale // 2 - 1
    top, bottom = pixel_values[..., first::scale, :], pixel_values[..., first + 1 :: scale, :]
    result = torch.add(top[..., first::scale], top[..., first + 1 :: scale])
    result += bottom[..., first::scale]
    result += bottom[..., first + 1 :: scale]
    return result.mul_(0.25)


def _canny(image: np.ndarray, low_threshold: float, high_threshold: float) -> np.ndarray:
    """Canny of one (H, W, 3) uint8 image as a bool (H, W) map."""
    return cv2.Canny(image, low_threshold, high_threshold) > 0


def compute_adapter_pixel_values(
    pixel_values: torch.Tensor,
    adapter_size: int = 256,
    edge_mode: str = "official",
    image_mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
    image_std: Sequence[float] = IMAGENET_DEFAULT_STD,
    low_threshold: float = 10.0,
    high_threshold: float = 100.0,
    valid_sizes: Sequence[Sequence[int]] | torch.Tensor | None = None,
) -> torch.Tensor:
    """The guiding branch's input: SAM's pixel values at `adapter_size` plus their Canny edge map.

    Args:
        pixel_values (`torch.Tensor` of shape `(batch_size, 3, 1024, 1024)`):
            SAM pixel values (normalised with the SAM mean/std and zero-padded).
        valid_sizes (`(batch_size, 2)` of `(height, width)`, *optional*):
            Where each image lies in `pixel_values` (the processor's `reshaped_input_sizes`); everything below and
            right of it must be SAM's zero padding. Only that region (plus a 2-pixel margin for Canny's 3 x 3
            neighbourhoods) is resized and edge-filtered; the padding's output is a constant the full computation
            gives too, so the result is the same bit for bit (tested) at about half the cost for a landscape photo.
            Ignored for sizes that fall back to `F.interpolate`, whose 4-tap weights reach across the border.

    Returns:
        `torch.Tensor` of shape `(batch_size, 4, adapter_size, adapter_size)` in the dtype of `pixel_values`.
    """
    if pixel_values.ndim != 4 or pixel_values.shape[1] != 3:
        raise ValueError(
            f"pixel_values must have shape (batch_size, 3, height, width), got {tuple(pixel_values.shape)}."
        )
    scale = _block_scale(pixel_values.shape[-2:], adapter_size)
    if valid_sizes is None or scale is None or pixel_values.device.type != "cpu":
        # Bilinear, align_corners=False, no antialias: the release's torch.nn.functional.interpolate call.
        small = resize_bilinear(pixel_values, adapter_size)
        edges = canny_edge_map(small, edge_mode, image_mean, image_std, low_threshold, high_threshold)
        return torch.cat([small, edges], dim=1).to(pixel_values.dtype)

    valid = torch.as_tensor(valid_sizes).reshape(-1, 2).tolist()
    if len(valid) != pixel_values.shape[0]:
        raise ValueError(f"valid_sizes has {len(valid)} entries for {pixel_values.shape[0]} images.")
    batch_size, dtype = pixel_values.shape[0], pixel_values.dtype
    result = torch.zeros(batch_size, 4, adapter_size, adapter_size, dtype=torch.float32)
    pixels = pixel_values.detach().float()
    for index, (height, width) in enumerate(valid):
        # Output pixel i reads input rows scale*i + scale/2 - 1 and + scale/2: rows past the image read padding.
        rows, cols = min(adapter_size, -(-int(height) // scale)), min(adapter_size, -(-int(width) // scale))
        result[index, :3, :rows, :cols] = _block_mean(pixels[index, :, : rows * scale, : cols * scale], scale)
        rows, cols = min(adapter_size, rows + 2), min(adapter_size, cols + 2)
        crop = result[index : index + 1, :3, :rows, :cols]
        as_uint8 = _edge_input_uint8(crop, edge_mode, image_mean, image_std)
        result[index, 3, :rows, :cols] = torch.from_numpy(_canny(as_uint8[0], low_threshold, high_threshold))
    return result.to(dtype)


class PASamImageProcessorKwargs(SamImageProcessorKwargs, total=False):
    r"""
    edge_mode (`str`, *optional*, defaults to `"official"`):
        Edge channel of the adapter input: `"official"` (release behaviour, needed for released weights) or `"rgb"`.
    adapter_size (`int`, *optional*, defaults to 256):
        Side of the adapter input (4 x the image embedding side).
    canny_low_threshold / canny_high_threshold (`float`, *optional*, defaults to 10 / 100):
        Canny hysteresis thresholds.
    """

    edge_mode: str
    adapter_size: int
    canny_low_threshold: float
    canny_high_threshold: float


_ADAPTER_KWARGS = ("edge_mode", "adapter_size", "canny_low_threshold", "canny_high_threshold")
# The remote-code entry of a saved image processor. transformers writes one config for both backends (it drops the
# "Pil" suffix of image_processor_type) and picks the backend when loading (`backend=`, torchvision if installed),
# so the entry names the class of each backend, whichever one saved it.
_AUTO_MAP_BACKENDS = {
    "torchvision": "image_processing_pasam.PASamImageProcessor",
    "pil": "image_processing_pasam.PASamImageProcessorPil",
}



class _AdapterInputMixin:
    """Adds `adapter_pixel_values` to the outputs of a SAM image processor backend."""

    edge_mode = "official"
    adapter_size = 256
    canny_low_threshold = 10.0
    canny_high_threshold = 100.0
    model_input_names = ["pixel_values", "adapter_pixel_values"]

    def _add_adapter_pixel_values(self, encoding: BatchFeature, kwargs: dict) -> BatchFeature:
        pixel_values = encoding["pixel_values"]
        as_list = isinstance(pixel_values, (list, tuple))
        stacked = torch.stack([torch.as_tensor(np.asarray(p) if not torch.is_tensor(p) else p) for p in pixel_values]) if as_list else torch.as_tensor(pixel_values)
        adapter = compute_adapter_pixel_values(
            stacked,
            adapter_size=kwargs.get("adapter_size") or self.adapter_size,
            edge_mode=kwargs.get("edge_mode") or self.edge_mode,
            image_mean=kwargs.get("image_mean") or self.image_mean,
            image_std=kwargs.get("image_std") or self.image_std,
            low_threshold=kwargs.get("canny_low_threshold") or self.canny_low_threshold,
            high_threshold=kwargs.get("canny_high_threshold") or self.canny_high_threshold,
            # SAM pads with zeros below and right of the resized image: only the image itself needs the work.
            valid_sizes=encoding.get("reshaped_input_sizes") if self._pads_with_zeros(kwargs) else None,
        )
        if as_list:
            first = pixel_values[0]
            encoding["adapter_pixel_values"] = [a if torch.is_tensor(first) else a.numpy() for a in adapter]
        elif isinstance(pixel_values, np.ndarray):
            encoding["adapter_pixel_values"] = adapter.numpy()
        else:
            encoding["adapter_pixel_values"] = adapter
        return encoding

    def to_dict(self) -> dict:
        """The backend's `to_dict`, with a remote-code entry (`auto_map`) that names both backends' classes."""
        output = super().to_dict()
        if "AutoImageProcessor" in (output.get("auto_map") or {}):
            output["auto_map"] = {**output["auto_map"], "AutoImageProcessor": dict(_AUTO_MAP_BACKENDS)}
        return output

    def _pads_with_zeros(self, kwargs: dict) -> bool:
        do_pad = kwargs.get("do_pad")
        return bool(self.do_pad if do_pad is None else do_pad)

    def _preprocess_image_like_inputs(self, images, segmentation_maps=None, **kwargs) -> BatchFeature:
        # Every image becomes upright RGB uint8 (H, W, 3) first, whatever its kind, dtype and layout (or a ValueError
        # naming it): SAM's own preprocessing would rescale floats in [0, 1] and uint16 by 1/255 and guess the
        # channel axis of small arrays. See pasam_hf.validation.
        size = kwargs.get("size")
        longest_edge = size.longest_edge if kwargs.get("do_resize") and size is not None else None
        images = prepare_images(
            images,
            data_format=kwargs.get("input_data_format"),
            longest_edge=longest_edge,
            convert_rgb=kwargs.get("do_convert_rgb") is not False,
        )
        # The value range was resolved above: uint8 pixels need exactly the 1/255 rescale.
        kwargs.update(input_data_format=ChannelDimension.LAST, do_rescale=True, rescale_factor=1 / 255)
        adapter_kwargs = {key: kwargs.pop(key, None) for key in _ADAPTER_KWARGS}
        encoding = super()._preprocess_image_like_inputs(images, segmentation_maps, **kwargs)
        if kwargs.get("return_tensors") is None and torch.is_tensor(encoding.get("pixel_values")):
            encoding["pixel_values"] = list(encoding["pixel_values"])  # SAM's type without tensors: a list
        adapter_kwargs.update(
            image_mean=kwargs.get("image_mean"), image_std=kwargs.get("image_std"), do_pad=kwargs.get("do_pad")
        )
        return self._add_adapter_pixel_values(encoding, adapter_kwargs)


class PASamImageProcessorPil(_AdapterInputMixin, SamImageProcessorPil):
    """PIL/NumPy backend: [`SamImageProcessorPil`] plus `adapter_pixel_values` of shape `(batch, 4, 256, 256)`."""

    valid_kwargs = PASamImageProcessorKwargs


if is_torchvision_available():
    from transformers.models.sam.image_processing_sam import SamImageProcessor

    class PASamImageProcessor(_AdapterInputMixin, SamImageProcessor):
        """Torchvision backend: [`SamImageProcessor`] plus `adapter_pixel_values` of shape `(batch, 4, 256, 256)`.

        Everything else (resizing to the longest edge, padding, `post_process_masks`, the automatic mask
        generation helpers) is SAM's.
        """

        valid_kwargs = PASamImageProcessorKwargs

        def process_image(self, image, do_convert_rgb=None, input_data_format=None, device=None, **kwargs):
            """SAM's `process_image`, except that an `(H, W, 3)` uint8 array becomes a channels-last `(3, H, W)`
            view rather than a contiguous copy.

            Every image arrives here in that form (`_preprocess_image_like_inputs` runs `prepare_images` first).
            torch's antialiased uint8 resize works on interleaved pixels: from a planar input it repacks them, so
            SAM's transposing copy and that repacking (together 2.5 ms of a 3 ms resize for a 480 x 854 photo on
            two CPU threads) buy nothing. The resized image is the same bytes either way (tested against SAM).
            """
            if not (
                isinstance(image, np.ndarray)
                and image.dtype == np.uint8
                and image.ndim == 3
                and image.shape[-1] == 3
                and input_data_format == ChannelDimension.LAST
            ):
                return super().process_image(
                    image, do_convert_rgb=do_convert_rgb, input_data_format=input_data_format, device=device, **kwargs
                )
            image = torch.from_numpy(image).permute(2, 0, 1)
            return image if device is None else image.to(device)

        def _preprocess(self, images, do_pad=None, pad_size=None, **kwargs):
            """SAM's `_preprocess`, except that the padded batch is written once, normalised in place.

            SAM converts each resized image to float32, normalises it, pads it into a new tensor, and
            `BatchFeature` then stacks the padded images into another: the batch (12 MB an image at 1024) is
            written twice and the image region four times. Here each image is converted straight into its corner
            of one batch tensor and normalised there with SAM's own fused mean and std, zeros around it. The same
            float operations in the same order, so the same values (tested bit for bit against SAM's processor),
            returned as one `(B, C, H, W)` tensor (`_preprocess_image_like_inputs` turns it back into SAM's list
            when no tensors are asked for).
            """
            if not do_pad:
                return super()._preprocess(images, do_pad=do_pad, pad_size=pad_size, **kwargs)
            normalize = bool(kwargs.get("do_normalize"))
            resized_kwargs = dict(kwargs, do_normalize=False, do_rescale=False) if normalize else kwargs
            processed, reshaped_input_sizes = super()._preprocess(
                images, do_pad=False, pad_size=pad_size, **resized_kwargs
            )
            height, width = pad_size.height, pad_size.width
            if any(image.shape[-2] > height or image.shape[-1] > width for image in processed):
                # SAM's pad raises the error that names the sizes.
                return self.pad(processed, pad_size=pad_size), reshaped_input_sizes
            first = processed[0]
            dtype = torch.float32 if normalize else first.dtype
            batch = torch.empty(len(processed), *first.shape[:-2], height, width, dtype=dtype, device=first.device)
            if normalize:
                mean, std, _ = self._fuse_mean_std_and_rescale_factor(
                    do_normalize=True,
                    image_mean=kwargs.get("image_mean"),
                    image_std=kwargs.get("image_std"),
                    do_rescale=kwargs.get("do_rescale"),
                    rescale_factor=kwargs.get("rescale_factor"),
                    device=first.device,
                )
            for target, image in zip(batch, processed):
                rows, cols = image.shape[-2:]
                target[..., rows:, :] = 0
                target[..., :rows, cols:] = 0
                # The image last: the adapter input is computed from it next, while it is still in cache.
                region = target[..., :rows, :cols]
                region.copy_(image)
                if normalize:
                    self.normalize(region, mean, std, inplace=True)
            return batch, reshaped_input_sizes


else:  # pragma: no cover - exercised only where torchvision is missing
    PASamImageProcessor = PASamImageProcessorPil


__all__ = [
    "PASamImageProcessor",
    "PASamImageProcessorPil",
    "canny_edge_map",
    "compute_adapter_pixel_values",
    "wrap_to_uint8",
]
