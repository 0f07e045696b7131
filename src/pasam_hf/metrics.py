"""Mask IoU and boundary IoU (Cheng et al., 2021), and an accumulator for per-subset results.

The HQSeg-44K protocol (HQ-SAM, PA-SAM) scores every object with the IoU of its mask and the IoU of its inner
boundary band (`0.02 x` image diagonal), averages each per dataset, and reports the mean of the dataset means.
See docs/evaluation.md.
"""

from __future__ import annotations

import csv
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch

from .boundary import mask_to_boundary

MaskLike = torch.Tensor | np.ndarray

# Convention for an empty union (neither mask has a pixel outside the ignored region): both agree that there is
# nothing there, which is a perfect score. COCO and Cheng et al.'s code would divide by zero instead.
EMPTY_UNION_IOU = 1.0


def _as_bool_masks(name: str, masks: MaskLike) -> torch.Tensor:
    masks = torch.as_tensor(masks)
    if masks.ndim < 2:
        raise ValueError(f"{name} must be masks of shape (N, H, W) or (H, W), got shape {tuple(masks.shape)}.")
    if masks.dtype != torch.bool:
        # Anything but 0/1 would be a probability or a label map: thresholding it here would hide the mistake.
        if not bool(((masks == 0) | (masks == 1)).all()):
            raise ValueError(
                f"{name} must be binary (bool or 0/1), got values {torch.unique(masks)[:6].tolist()}; threshold "
                "logits at 0, or compare label maps with the foreground value first (e.g. gt > 128)."
            )
        masks = masks.bool()
    return masks


def _checked(pred: MaskLike, gt: MaskLike, ignore: MaskLike | None) -> tuple[torch.Tensor, ...]:
    pred = _as_bool_masks("pred", pred)
    gt = _as_bool_masks("gt", gt).to(pred.device)
    if pred.shape != gt.shape:
        raise ValueError(
            f"pred and gt must have the same shape, got {tuple(pred.shape)} and {tuple(gt.shape)}; resize the "
            "prediction to the ground truth's size (e.g. bilinear upsampling of the logits) before scoring."
        )
    valid = torch.ones_like(gt)
    if ignore is not None:
        ignore = _as_bool_masks("ignore", ignore).to(gt.device)
        if ignore.shape != gt.shape:
            raise ValueError(f"ignore must have the shape of gt {tuple(gt.shape)}, got {tuple(ignore.shape)}.")
        valid = ~ignore
    return pred, gt, valid


def _iou(pred: torch.Tensor, gt: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    intersection = (pred & gt & valid).sum(dim=(-2, -1)).double()
    union = ((pred | gt) & valid).sum(dim=(-2, -1)).double()
    return torch.where(union > 0, intersection / union.clamp(min=1), torch.full_like(union, EMPTY_UNION_IOU))


def mask_iou(pred: MaskLike, gt: MaskLike, ignore: MaskLike | None = None) -> torch.Tensor:
    """Intersection over union of binary masks, one value per mask.

    Args:
        pred (`torch.Tensor` or `np.ndarray` of shape `(N, H, W)` or `(H, W)`): predicted masks, bool or 0/1.
        gt (same shape as `pred`): ground-truth masks, bool or 0/1.
        ignore (same shape as `pred`, *optional*): pixels excluded from both masks (void labels), bool or 0/1.

    Returns:
        `torch.Tensor` of shape `(N,)` (a 0-d tensor for `(H, W)` inputs), float64 in [0, 1]. When the union is
        empty (both masks are empty outside `ignore`) the IoU is `EMPTY_UNION_IOU` = 1: the prediction agrees
        with the ground truth that there is nothing there.
    """
    return _iou(*_checked(pred, gt, ignore))


def boundary_iou(
    pred: MaskLike, gt: MaskLike, dilation_ratio: float = 0.02, ignore: MaskLike | None = None
) -> torch.Tensor:
    """Boundary IoU (Cheng et al., 2021): the IoU of the masks' inner boundary bands.

    Each band is the mask minus its erosion by `d = max(1, round(dilation_ratio x sqrt(H^2 + W^2)))` pixels
    (`pasam_hf.boundary.mask_to_boundary`), the image border counting as background, so an object touching the
    border has a boundary along it. `H, W` are the masks' own size: score at the original image size.

    Args:
        pred (`torch.Tensor` or `np.ndarray` of shape `(N, H, W)` or `(H, W)`): predicted masks, bool or 0/1.
        gt (same shape as `pred`): ground-truth masks, bool or 0/1.
        dilation_ratio (`float`): band width as a fraction of the image diagonal (0.02 in HQ-SAM and PA-SAM).
        ignore (same shape as `pred`, *optional*): void pixels. The bands are taken from the full masks (an
            ignored pixel is background for the erosion, as it is not `gt` foreground), then the ignored pixels
            are removed from both bands before the intersection and union are counted.

    Returns:
        `torch.Tensor` of shape `(N,)`, float64 in [0, 1]; 1 when both bands are empty outside `ignore` (both
        masks empty, see [`mask_iou`]).
    """
    pred, gt, valid = _checked(pred, gt, ignore)
    return _iou(mask_to_boundary(pred, dilation_ratio), mask_to_boundary(gt, dilation_ratio), valid)


@dataclass
class SegmentationMetrics:
    """Per-object scores of an evaluation, grouped by subset (dataset).

    Each row is one scored object: `subset`, `image`, `instance` (index among the image's masks), `iou`,
    `boundary_iou`. `Average` is the mean of the subset means (HQ-SAM's "mean of the 4 dataset means"), not the
    mean over all rows, so a large dataset does not outweigh the others.

    Example:

    ```python
    >>> metrics = SegmentationMetrics()
    >>> metrics.add("a.jpg", iou=0.9, boundary_iou=0.8, subset="DIS")
    >>> metrics.add("b.jpg", iou=0.7, boundary_iou=0.6, subset="COIFT")
    >>> metrics.mean_of_means()
    {'mean_iou': 0.8, 'mean_boundary_iou': 0.7}
    ```
    """

    rows: list[dict[str, Any]] = field(default_factory=list)
    # Objects not scored: ground-truth instances without any foreground pixel (no box can be drawn around them),
    # and images whose files cannot be read (one each).
    skipped: int = 0
    # Why: one `{"subset", "image", "count", "reason"}` per image with skipped objects (see `skip`).
    skipped_samples: list[dict[str, Any]] = field(default_factory=list)

    COLUMNS = ("subset", "image", "instance", "iou", "boundary_iou")

    def add(self, image: str, iou: float, boundary_iou: float, subset: str = "", instance: int = 0) -> None:
        """Add the scores of one object."""
        for name, value in (("iou", iou), ("boundary_iou", boundary_iou)):
            if not 0.0 <= float(value) <= 1.0:
                raise ValueError(f"{name} of {image!r} instance {instance} is {value}; scores lie in [0, 1].")
        self.rows.append(
            {"subset": subset, "image": image, "instance": int(instance), "iou": float(iou),
             "boundary_iou": float(boundary_iou)}
        )

    def skip(self, image: str, reason: str, subset: str = "", count: int = 1) -> None:
        """Count `count` objects of `image` as not scored, and say why (the table and `to_dict` list them)."""
        self.skipped += count
        self.skipped_samples.append({"subset": subset, "image": image, "count": int(count), "reason": reason})

    def add_masks(
        self,
        image: str,
        pred: MaskLike,
        gt: MaskLike,
        ignore: MaskLike | None = None,
        subset: str = "",
        instances: Iterable[int] | None = None,
        dilation_ratio: float = 0.02,
    ) -> None:
        """Score the `(N, H, W)` masks of one image ([`mask_iou`], [`boundary_iou`]) and add one row per mask.

        `instances` numbers the rows (defaults to `0..N-1`), e.g. to keep the indices of the image's instances
        when some were skipped.
        """
        pred, gt, valid = _checked(pred, gt, ignore)
        if pred.ndim == 2:
            pred, gt, valid = pred[None], gt[None], valid[None]
        ious = _iou(pred, gt, valid)
        boundary_ious = _iou(mask_to_boundary(pred, dilation_ratio), mask_to_boundary(gt, dilation_ratio), valid)
        indices = range(len(ious)) if instances is None else list(instances)
        for index, iou, b_iou in zip(indices, ious.tolist(), boundary_ious.tolist(), strict=True):
            self.add(image, iou, b_iou, subset=subset, instance=index)

    def __len__(self) -> int:
        return len(self.rows)

    def subsets(self) -> list[str]:
        """Subset names in the order they first appear."""
        return list(dict.fromkeys(row["subset"] for row in self.rows))

    def subset_means(self) -> dict[str, dict[str, float]]:
        """`{subset: {"count", "mean_iou", "mean_boundary_iou"}}` over the rows of each subset."""
        means = {}
        for subset in self.subsets():
            rows = [row for row in self.rows if row["subset"] == subset]
            means[subset] = {
                "count": len(rows),
                "mean_iou": float(np.mean([row["iou"] for row in rows])),
                "mean_boundary_iou": float(np.mean([row["boundary_iou"] for row in rows])),
            }
        return means

    def mean_of_means(self) -> dict[str, float]:
        """`{"mean_iou", "mean_boundary_iou"}`: the mean of the subset means (NaN when nothing was scored)."""
        means = list(self.subset_means().values())
        if not means:
            return {"mean_iou": math.nan, "mean_boundary_iou": math.nan}
        return {key: float(np.mean([m[key] for m in means])) for key in ("mean_iou", "mean_boundary_iou")}

    def to_dict(self) -> dict[str, Any]:
        """Summary and rows: `{"average", "subsets", "num_scored", "num_skipped", "skipped", "rows"}` (`skipped`:
        the images with objects not scored, and why)."""
        return {
            "average": self.mean_of_means(),
            "subsets": self.subset_means(),
            "num_scored": len(self.rows),
            "num_skipped": self.skipped,
            "skipped": list(self.skipped_samples),
            "rows": list(self.rows),
        }

    def to_csv(self, path: str | os.PathLike) -> Path:
        """Write one line per scored object (columns `COLUMNS`) to `path`; returns the path."""
        path = Path(path)
        with path.open("w", newline="", encoding="utf-8") as file:
            writer = csv.DictWriter(file, fieldnames=self.COLUMNS)
            writer.writeheader()
            writer.writerows(self.rows)
        return path

    def to_json(self, path: str | os.PathLike) -> Path:
        """Write [`to_dict`] to `path` as JSON (NaN averages become `null`); returns the path."""
        path = Path(path)
        summary = self.to_dict()
        summary["average"] = {k: (None if math.isnan(v) else v) for k, v in summary["average"].items()}
        path.write_text(json.dumps(summary, indent=1) + "\n", encoding="utf-8")
        return path

    def summary_table(self) -> str:
        """The per-subset means and their average as a fixed-width text table, scores in percent."""
        means = self.subset_means()
        if not means:
            return f"no object scored ({self._skipped_text()})" + self._skipped_lines()
        names = [subset or "(all)" for subset in means] + ["Average"]
        width = max(len(name) for name in names + ["Subset"])
        lines = [f"{'Subset':<{width}}  {'Objects':>7}  {'mIoU':>6}  {'mBIoU':>6}"]
        lines.append("-" * len(lines[0]))
        for name, values in zip(names, means.values()):
            lines.append(
                f"{name:<{width}}  {values['count']:>7d}  {100 * values['mean_iou']:>6.2f}  "
                f"{100 * values['mean_boundary_iou']:>6.2f}"
            )
        average = self.mean_of_means()
        lines.append(
            f"{'Average':<{width}}  {len(self.rows):>7d}  {100 * average['mean_iou']:>6.2f}  "
            f"{100 * average['mean_boundary_iou']:>6.2f}"
        )
        if self.skipped:
            lines.append(f"({self._skipped_text()})")
        return "\n".join(lines) + self._skipped_lines()

    def _skipped_text(self) -> str:
        if self.skipped_samples:
            images = len(self.skipped_samples)
            return f"{self.skipped} objects skipped, in {images} image{'s' if images > 1 else ''}:"
        return f"{self.skipped} instances without foreground skipped"

    def _skipped_lines(self) -> str:
        return "".join(
            f"\n  {sample['image']}: {sample['reason']}"
            + (f" ({sample['count']} objects)" if sample["count"] != 1 else "")
            for sample in self.skipped_samples
        )


def load_evaluate_metric(**kwargs) -> "evaluate.EvaluationModule":  # noqa: F821 - imported lazily
    """The `pasam_segmentation` metric shipped with pasam_hf, loaded with `evaluate.load` (offline: it is a local
    script). `kwargs` go to `evaluate.load` (e.g. `experiment_id`, `keep_in_memory`)."""
    import evaluate

    script = Path(__file__).parent / "evaluate_metrics" / "pasam_segmentation" / "pasam_segmentation.py"
    if not script.is_file():
        raise FileNotFoundError(
            f"{script} is missing: this pasam_hf install lacks its package data; reinstall pasam-hf."
        )
    return evaluate.load(str(script), **kwargs)


__all__ = ["EMPTY_UNION_IOU", "SegmentationMetrics", "boundary_iou", "load_evaluate_metric", "mask_iou"]
