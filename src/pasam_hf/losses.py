"""PA-SAM training losses (reference section 6), all weight 1, computed at the labels' resolution.

- BCE + Dice on the final mask;
- BCE + Dice on the coarse mask where the (detached) uncertainty map is < 0.5 and on the refined mask where it
  is >= 0.5;
- BCE between the uncertainty map and a boundary band target (inner boundary of the foreground plus inner
  boundary of the background, band width round(0.005 x diagonal) >= 1).

Labels are targets where they lie in [0, 1]: hard 0 / 1, or soft fractions, which BCE and Dice use as they are,
as the release does with its bilinearly resized labels (`label / 255`, reference section 6). Any other value (the
void value 255) is ignored everywhere. The uncertainty map's boundary band is drawn around the pixels above
`FOREGROUND_THRESHOLD` (128 / 255, HQSeg-44K's `> 128`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .boundary import mask_to_boundary
from .labels import foreground_pixels, labelled_pixels

UNCERTAINTY_BAND_RATIO = 0.005


def _upsample(maps: torch.Tensor, size: tuple[int, int], align_corners: bool = False) -> torch.Tensor:
    """`(N, h, w)` -> `(N, H, W)`, bilinear."""
    return F.interpolate(maps.unsqueeze(1).float(), size=size, mode="bilinear", align_corners=align_corners).squeeze(1)


def sigmoid_bce(logits: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Per-mask BCE-with-logits (soft `targets` in [0, 1] allowed) averaged over the pixels where `weights` is 1.
    Shapes `(N, H, W)` -> `(N,)`."""
    loss = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    return (loss * weights).sum((-2, -1)) / weights.sum((-2, -1)).clamp_min(1e-8)


def dice_loss(logits: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Per-mask soft Dice loss `1 - (2|P.T| + 1) / (|P| + |T| + 1)` over the pixels where `weights` is 1 (`T` may be
    soft)."""
    probs = logits.sigmoid() * weights
    targets = targets * weights
    numerator = 2 * (probs * targets).sum((-2, -1))
    denominator = probs.sum((-2, -1)) + targets.sum((-2, -1))
    return 1 - (numerator + 1) / (denominator + 1)


def uncertainty_target(foreground: torch.Tensor, band_ratio: float = UNCERTAINTY_BAND_RATIO) -> torch.Tensor:
    """Boundary band target of the uncertainty map: inner boundary of the foreground (image border counted as
    background) plus inner boundary of the background (image border counted as background too, so the frame is
    not a boundary of the background). `(N, H, W)` bool -> `(N, H, W)` float in {0, 1}."""
    band = mask_to_boundary(foreground, band_ratio, border_value=0.0) | mask_to_boundary(
        ~foreground, band_ratio, border_value=1.0
    )
    return band.float()


def pasam_loss_components(
    pred_masks: torch.Tensor,
    coarse_masks: torch.Tensor,
    refined_masks: torch.Tensor,
    uncertainty_maps: torch.Tensor,
    labels: torch.Tensor,
) -> dict[str, torch.Tensor]:
    r"""The PA-SAM loss terms, each averaged over masks.

    Args:
        pred_masks (`torch.Tensor` of shape `(B, P, 1, 256, 256)`): final mask logits (single-mask output).
        coarse_masks, refined_masks (`torch.Tensor` of shape `(B, P, 1, 64, 64)`): adapter logits.
        uncertainty_maps (`torch.Tensor` of shape `(B, P, 1, 64, 64)`): uncertainty in [0, 1].
        labels (`torch.Tensor` of shape `(B, P, H, W)`): targets in [0, 1] (hard 0 / 1, or soft fractions at
            object edges), anything else (255) ignored.

    Returns:
        `dict` with `mask_bce`, `mask_dice`, `adapter_bce`, `adapter_dice`, `uncertainty_bce` (scalars), each the
        mean over the masks that have at least one labelled pixel (so padding prompts, labelled all-void, add
        nothing).
    """
    # In fp32 outside autocast: CUDA autocast refuses binary_cross_entropy, and means over 1024 x 1024 label pixels
    # are no job for 16-bit floats (mixed-precision training with Accelerate or the Trainer).
    with torch.autocast(device_type=pred_masks.device.type, enabled=False):
        return _loss_components(
            pred_masks.float(), coarse_masks.float(), refined_masks.float(), uncertainty_maps.float(), labels
        )


def _loss_components(
    pred_masks: torch.Tensor,
    coarse_masks: torch.Tensor,
    refined_masks: torch.Tensor,
    uncertainty_maps: torch.Tensor,
    labels: torch.Tensor,
) -> dict[str, torch.Tensor]:
    if pred_masks.ndim != 5 or pred_masks.shape[2] != 1:
        raise ValueError(
            "The PA-SAM loss takes the single refined mask: call the model with multimask_output=False when "
            f"passing labels; got pred_masks of shape "
            f"{tuple(pred_masks.shape)}."
        )
    if labels.ndim != 4 or labels.shape[:2] != pred_masks.shape[:2]:
        raise ValueError(
            f"labels must have shape (batch_size, point_batch_size, height, width) = {tuple(pred_masks.shape[:2])} + "
            f"(H, W), one mask per prompt; got {tuple(labels.shape)}."
        )
    size = tuple(labels.shape[-2:])
    labels = labels.reshape(-1, *size)
    has_target = labelled_pixels(labels)
    valid = has_target.float()
    targets = torch.where(has_target, labels.float(), 0.0)

    final = _upsample(pred_masks.reshape(-1, *pred_masks.shape[-2:]), size)
    coarse = _upsample(coarse_masks.reshape(-1, *coarse_masks.shape[-2:]), size)
    refined = _upsample(refined_masks.reshape(-1, *refined_masks.shape[-2:]), size)
    uncertainty = uncertainty_maps.reshape(-1, *uncertainty_maps.shape[-2:])
    selected_refined = (_upsample(uncertainty.detach(), size) >= 0.5).float()
    use_refined = selected_refined * valid
    use_coarse = (1 - selected_refined) * valid

    band = uncertainty_target(foreground_pixels(labels))
    uncertainty_up = _upsample(uncertainty, size, align_corners=True).clamp(0.0, 1.0)
    uncertainty_bce = F.binary_cross_entropy(uncertainty_up, band, reduction="none")
    uncertainty_bce = (uncertainty_bce * valid).sum((-2, -1)) / valid.sum((-2, -1)).clamp_min(1e-8)

    # Masks without a single labelled pixel (padding prompts in a batch) do not count in the means.
    labelled = (valid.sum((-2, -1)) > 0).float()
    num_labelled = labelled.sum().clamp_min(1.0)

    def mean(per_mask: torch.Tensor) -> torch.Tensor:
        return (per_mask * labelled).sum() / num_labelled

    return {
        "mask_bce": mean(sigmoid_bce(final, targets, valid)),
        "mask_dice": mean(dice_loss(final, targets, valid)),
        "adapter_bce": mean(sigmoid_bce(coarse, targets, use_coarse) + sigmoid_bce(refined, targets, use_refined)),
        "adapter_dice": mean(dice_loss(coarse, targets, use_coarse) + dice_loss(refined, targets, use_refined)),
        "uncertainty_bce": mean(uncertainty_bce),
    }


def pasam_loss(
    pred_masks: torch.Tensor,
    coarse_masks: torch.Tensor,
    refined_masks: torch.Tensor,
    uncertainty_maps: torch.Tensor,
    labels: torch.Tensor,
) -> torch.Tensor:
    """Sum of [`pasam_loss_components`] (all weights 1, as released)."""
    return sum(pasam_loss_components(pred_masks, coarse_masks, refined_masks, uncertainty_maps, labels).values())


__all__ = ["dice_loss", "pasam_loss", "pasam_loss_components", "sigmoid_bce", "uncertainty_target"]
