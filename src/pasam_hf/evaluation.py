"""Box-prompted evaluation of a PA-SAM (or SAM) model on image/mask records: mIoU and boundary IoU per subset.

The protocol is HQ-SAM's, which PA-SAM reports on HQSeg-44K (reference section 7): every ground-truth object is
prompted with its tight box, the single mask the adapter refines is predicted, its logits are brought to the
ground truth's size, thresholded at 0, and scored with [`pasam_hf.metrics.mask_iou`] and
[`pasam_hf.metrics.boundary_iou`] (band of `0.02 x` diagonal); the summary is the mean of the subset means. See
docs/evaluation.md.

```python
>>> from pasam_hf import PASamModel, PASamProcessor
>>> from pasam_hf.data import load_records
>>> from pasam_hf.evaluation import evaluate_model
>>> metrics = evaluate_model(model, processor, load_records("HQSeg-44K/val"), squash=True)
>>> print(metrics.summary_table())
```
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torchvision.ops import masks_to_boxes
from tqdm.auto import tqdm

from .data.records import FOREGROUND, IGNORE, SegmentationRecord
from .data.sources import BadSampleError, RecordSequence
from .metrics import SegmentationMetrics
from .modeling_pasam import PASamModel
from .processing_pasam import PASamProcessor


def box_prompts(foreground: torch.Tensor) -> torch.Tensor:
    """Tight boxes around binary masks, `[x_min, y_min, x_max, y_max]` in pixels.

    The corners are the first and last foreground column/row indices, the convention of
    `torchvision.ops.masks_to_boxes` that HQ-SAM's evaluation uses. An object one pixel thick would give a box of
    zero width or height, which the processor rejects; its far side is moved one pixel out instead, so that the box
    covers the object's pixels.

    Args:
        foreground (`torch.Tensor` of shape `(K, H, W)`, bool): masks, each with at least one pixel set.

    Returns:
        `torch.Tensor` of shape `(K, 4)`, float32.
    """
    if foreground.ndim != 3:
        raise ValueError(f"foreground must have shape (K, H, W), got {tuple(foreground.shape)}.")
    if not bool(foreground.flatten(1).any(dim=1).all()):
        raise ValueError("every mask needs a foreground pixel to have a box; leave empty masks out first.")
    # The training prompts' tight boxes (PromptSimulator.tight_boxes) come from the same function.
    boxes = masks_to_boxes(foreground).float()
    boxes[:, 2] = torch.where(boxes[:, 2] > boxes[:, 0], boxes[:, 2], boxes[:, 0] + 1)
    boxes[:, 3] = torch.where(boxes[:, 3] > boxes[:, 1], boxes[:, 3], boxes[:, 1] + 1)
    return boxes


def squash_image(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resize an RGB image to `size = (height, width)` ignoring its aspect ratio (HQ-SAM's evaluation input).

    As the release computes it (reference section 7): the image as floats, bilinear `F.interpolate`
    (`align_corners=False`, no antialiasing), then cast to uint8 by truncation (numpy's `astype`; the values are in
    [0, 255], so truncation is the floor). Rounding instead would change about half of the bytes by 1, and with them
    the official edge map and the masks.

    Args:
        image (`np.ndarray` of shape `(H, W, 3)`, uint8).

    Returns:
        `np.ndarray` of shape `(*size, 3)`, uint8.
    """
    pixels = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)[None].float()
    resized = F.interpolate(pixels, size=size, mode="bilinear", align_corners=False)
    # A convex combination of bytes stays in [0, 255]; the clamp only guards against float rounding at the ends.
    return resized[0].permute(1, 2, 0).trunc().clamp(0, 255).to(torch.uint8).numpy()


@dataclass
class _Item:
    """One record ready for the model: its image as the processor gets it and the objects that can be scored."""

    name: str
    subset: str
    image: np.ndarray  # (h, w, 3) uint8, the processor's input (squashed or not)
    boxes: torch.Tensor  # (P, 4) in the pixels of `image`
    ground_truth: torch.Tensor  # (P, H, W) bool, at the original size
    ignore: torch.Tensor  # (P, H, W) bool, void pixels
    instances: list[int]  # index of each scored object among the record's instances


def _prepare(record: SegmentationRecord, subset: str, squash_size: tuple[int, int] | None) -> tuple[_Item | None, int]:
    """The scorable objects of a record, and how many of its instances have no foreground (they are skipped)."""
    instances = torch.from_numpy(record.instances)
    foreground = instances == FOREGROUND
    scorable = foreground.flatten(1).any(dim=1)
    # A record without instances is an empty mask: one object that cannot be prompted.
    skipped = int((~scorable).sum()) if record.num_instances else 1
    if not bool(scorable.any()):
        return None, skipped
    foreground = foreground[scorable]
    boxes = box_prompts(foreground)
    image = np.array(record.image.convert("RGB"))
    if squash_size is not None:
        height, width = image.shape[:2]
        image = squash_image(image, squash_size)
        scale = torch.tensor([squash_size[1] / width, squash_size[0] / height] * 2)
        boxes = boxes * scale
    item = _Item(
        name=record.name,
        subset=subset,
        image=image,
        boxes=boxes,
        ground_truth=foreground,
        ignore=instances[scorable] == IGNORE,
        instances=torch.nonzero(scorable).flatten().tolist(),
    )
    return item, skipped


def _samples(records: Iterable[SegmentationRecord]) -> Iterator[SegmentationRecord | BadSampleError]:
    """The records, and the [`BadSampleError`] of each sample that cannot be read (iterating a `RecordSequence`
    or `IterableRecords` would only warn about those), so that every sample is scored or counted."""
    if isinstance(records, RecordSequence):
        for index in range(len(records)):
            try:
                yield records[index]
            except BadSampleError as error:
                yield error
    elif hasattr(records, "iter_samples"):
        yield from records.iter_samples()
    else:
        yield from records


def _skip_reason(record: SegmentationRecord, skipped: int) -> str:
    if not record.num_instances:
        return "the mask has no foreground pixel (no object to score)"
    return f"{skipped} of its {record.num_instances} instances have no foreground pixel (no box to prompt)"


def _batches(items: Iterable[_Item], batch_size: int) -> Iterator[list[_Item]]:
    batch: list[_Item] = []
    for item in items:
        batch.append(item)
        if len(batch) == batch_size:
            yield batch
            batch = []
    if batch:
        yield batch


def _predict(
    model: PASamModel, processor: PASamProcessor, batch: list[_Item], squash: bool, device: torch.device
) -> list[torch.Tensor]:
    """Binary masks `(P, H, W)` at the original size for each item of `batch`, from one forward pass."""
    # The processor needs as many prompts on every image: repeat an image's last box up to the batch's largest
    # count. The decoder treats each prompt on its own, so the repeats change no other prompt's mask; their
    # outputs are dropped.
    num_prompts = max(len(item.boxes) for item in batch)
    boxes = [
        torch.cat([item.boxes, item.boxes[-1:].expand(num_prompts - len(item.boxes), 4)]).tolist() for item in batch
    ]
    inputs = processor(images=[item.image for item in batch], input_boxes=boxes, return_tensors="pt")
    model_inputs = {
        key: inputs[key].to(device=device, dtype=model.dtype if key.endswith("pixel_values") else None)
        for key in ("pixel_values", "adapter_pixel_values", "input_boxes")
    }
    outputs = model(**model_inputs, multimask_output=False)
    predictions = []
    for index, item in enumerate(batch):
        # (P, 1, h, w) mask logits in the model's input frame, in float32 for the interpolation.
        logits = outputs.pred_masks[index, : len(item.boxes)].float()
        size = tuple(item.ground_truth.shape[-2:])
        if squash:
            # HQ-SAM: the squashed square holds the whole image, so its logits go straight to the original size.
            masks = F.interpolate(logits, size=size, mode="bilinear", align_corners=False) > 0
        else:
            masks = processor.post_process_masks(
                [logits],
                inputs["original_sizes"][index : index + 1],
                inputs["reshaped_input_sizes"][index : index + 1],
                mask_threshold=0.0,
                binarize=True,
            )[0]
        predictions.append(masks[:, 0])
    return predictions


def evaluate_model(
    model: PASamModel,
    processor: PASamProcessor,
    records: Iterable[SegmentationRecord],
    *,
    squash: bool = False,
    batch_size: int = 4,
    subset: str | None = None,
    dilation_ratio: float = 0.02,
    progress: bool = True,
    device: str | torch.device | None = None,
) -> SegmentationMetrics:
    """Score box-prompted single-mask predictions against every instance of `records`.

    For each image, every instance with a foreground pixel is prompted with its tight box ([`box_prompts`]); all
    of them go to the model as the image's `P` prompts of one forward pass, `batch_size` images at a time. Each
    prediction (the first, adapter-refined mask) is brought to the ground truth's size, thresholded at 0 and
    scored against the instance outside its void pixels.

    Args:
        model ([`PASamModel`]): the model; it is evaluated in eval mode (hard point mining on) and its training
            mode restored afterwards.
        processor ([`PASamProcessor`]): the processor that ships with the model.
        records (iterable of [`SegmentationRecord`]): images with `(K, H, W)` instances (1 foreground, 0
            background, 255 void), e.g. from [`pasam_hf.data.load_records`].
        squash (`bool`, *optional*, defaults to `False`): HQ-SAM's protocol (reference section 7): each image is
            resized to the model's square input (1024 x 1024) ignoring its aspect ratio, as the release does
            ([`squash_image`]: bilinear on floats, truncated to uint8), boxes scaled with it, and the low-resolution
            (256 x 256) logits are upsampled bilinearly straight to the ground truth's size (the ground truth itself
            is never resized).
            `False` keeps the aspect ratio (resize the longest side, pad) and brings the logits back with
            `processor.post_process_masks`, as for any other prediction.
        batch_size (`int`, *optional*, defaults to 4): images per forward pass.
        subset (`str`, *optional*): subset name for every record; by default each record's own `subset` (its
            sub-folder), so that the summary is the mean of the subset means.
        dilation_ratio (`float`, *optional*, defaults to 0.02): boundary band width for the boundary IoU, as a
            fraction of the image diagonal.
        progress (`bool`, *optional*, defaults to `True`): show a progress bar over the images.
        device (`str` or `torch.device`, *optional*): where to run; the model is moved there. Defaults to the
            model's device.

    Returns:
        [`SegmentationMetrics`]: one row per scored object (`instance` is its index among the record's instances);
        `skipped` counts instances without foreground, records with an empty mask and samples that cannot be read
        (one each), and `skipped_samples` says why for each image.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size is {batch_size}; use 1 or more images per forward pass.")
    if device is not None:
        model.to(device)
    device = model.device
    squash_size = None
    if squash:
        pad_size = processor.image_processor.pad_size
        squash_size = (int(pad_size["height"]), int(pad_size["width"]))

    metrics = SegmentationMetrics()

    def items() -> Iterator[_Item]:
        for record in _samples(records):
            bar.update(1)
            if isinstance(record, BadSampleError):
                # An unreadable file, or a mask that does not fit its image: its objects are unknown, count one.
                metrics.skip(record.name, record.reason, subset="" if subset is None else subset)
                continue
            record_subset = record.subset if subset is None else subset
            item, skipped = _prepare(record, record_subset, squash_size)
            if skipped:
                metrics.skip(record.name, _skip_reason(record, skipped), subset=record_subset, count=skipped)
            if item is not None:
                yield item

    total = len(records) if hasattr(records, "__len__") else None
    bar = tqdm(total=total, desc="evaluate", unit="image", disable=not progress)
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for batch in _batches(items(), batch_size):
                for item, prediction in zip(batch, _predict(model, processor, batch, squash, device), strict=True):
                    metrics.add_masks(
                        item.name,
                        prediction,
                        item.ground_truth,
                        ignore=item.ignore,
                        subset=item.subset,
                        instances=item.instances,
                        dilation_ratio=dilation_ratio,
                    )
    finally:
        model.train(was_training)
        bar.close()
    return metrics


__all__ = ["box_prompts", "evaluate_model", "squash_image"]
