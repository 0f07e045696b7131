"""Prompt simulation for training: boxes, points and noisy masks drawn from the ground-truth masks.

One prompt kind is drawn per *batch* (not per instance): a batch is one forward pass and SAM's prompt encoder takes
one kind of sparse prompt per call, so every instance of the batch gets a prompt of the same kind. Over many batches
the kinds follow the preset's frequencies:

- `"pa-sam"` (the release, reference section 6): box 4/7, points 2/7, noisy mask 1/7;
- `"hq-sam"`: 1/3 each.

Every prompt is in the frame of the augmented `S x S` image, vectorised over all instances of the batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torchvision.ops import masks_to_boxes

from ..validation import DEFAULT_POINT_PAD_VALUE
from .records import BACKGROUND, FOREGROUND, foreground_pixels, labelled_pixels

PROMPT_KINDS = ("boxes", "points", "masks")
PRESETS: dict[str, dict[str, float]] = {
    "pa-sam": {"boxes": 4 / 7, "points": 2 / 7, "masks": 1 / 7},
    "hq-sam": {"boxes": 1 / 3, "points": 1 / 3, "masks": 1 / 3},
}
# Noisy masks: band of pixels where the mask differs from its blurred version by at least this much.
INCOHERENT_THRESHOLD = 0.01
# Values of a noisy-mask prompt outside and inside the mask: the release feeds SAM's mask encoder 0 / 255.
RELEASE_MASK_PROMPT_VALUES = (0.0, 255.0)


class PromptSimulator:
    """Draws one kind of prompt for all instances of a batch.

    Args:
        preset (`str` or `dict[str, float]`, defaults to `"pa-sam"`):
            `"pa-sam"`, `"hq-sam"`, or a dict of kind -> weight over `"boxes"`, `"points"`, `"masks"`.
        num_points (`int`, defaults to 10): foreground points per instance (label 1).
        num_negative_points (`int`, defaults to 0): background points per instance (label 0), after the
            foreground ones. Instances without background get padding points (label -10) instead.
        box_noise (`bool`, defaults to `False`): jitter box corners (see [`noisy_boxes`]). The release trains with
            tight boxes (reference section 6), hence the default.
        box_noise_ratio (`float`, defaults to 0.1): noise std as a fraction of the box side.
        box_noise_max (`float`, defaults to 20): noise clip, in pixels.
        mask_prompt_size (`int`, *optional*): side `M` of mask prompts; defaults to `S // 4` (256 for S = 1024).
        incoherent_factor (`int`, defaults to 8): down-sampling factor defining the noisy-mask band.
        mask_noise_std (`float`, defaults to 1.0): std of the Gaussian noise added inside the band.
        mask_prompt_values (`tuple[float, float]`, defaults to `(0.0, 255.0)`): the values a noisy-mask prompt takes
            outside and inside the mask. `(0, 255)` is what the release feeds SAM's mask encoder (reference section
            6). A model that will be prompted with mask logits (SAM's low-resolution output of an earlier
            prediction, as `input_masks` documents) is better trained with logit-like values, e.g. `(-20.0, 20.0)`.
        seed (`int`, *optional*): seeds a new generator; or pass `generator`.
        generator (`torch.Generator`, *optional*): the source of all randomness.
    """

    def __init__(
        self,
        preset: str | dict[str, float] = "pa-sam",
        num_points: int = 10,
        num_negative_points: int = 0,
        box_noise: bool = False,
        box_noise_ratio: float = 0.1,
        box_noise_max: float = 20.0,
        mask_prompt_size: int | None = None,
        incoherent_factor: int = 8,
        mask_noise_std: float = 1.0,
        mask_prompt_values: tuple[float, float] = RELEASE_MASK_PROMPT_VALUES,
        seed: int | None = None,
        generator: torch.Generator | None = None,
    ):
        weights = PRESETS.get(preset) if isinstance(preset, str) else preset
        if weights is None:
            raise ValueError(f"preset={preset!r} is not one of {list(PRESETS)}; or pass a dict kind -> weight.")
        unknown = set(weights) - set(PROMPT_KINDS)
        if unknown or not weights or min(weights.values()) < 0 or sum(weights.values()) <= 0:
            raise ValueError(
                f"prompt weights {weights} must be non-negative, not all zero, over the kinds {PROMPT_KINDS}."
            )
        if num_points < 1 and num_negative_points < 1:
            raise ValueError("num_points + num_negative_points must be at least 1 for point prompts.")
        self.kinds = [kind for kind in PROMPT_KINDS if weights.get(kind, 0) > 0]
        self.probabilities = torch.tensor([float(weights[kind]) for kind in self.kinds], dtype=torch.float64)
        self.num_points = num_points
        self.num_negative_points = num_negative_points
        self.box_noise = box_noise
        self.box_noise_ratio = box_noise_ratio
        self.box_noise_max = box_noise_max
        self.mask_prompt_size = mask_prompt_size
        self.incoherent_factor = incoherent_factor
        self.mask_noise_std = mask_noise_std
        if len(mask_prompt_values) != 2:
            raise ValueError(
                f"mask_prompt_values={mask_prompt_values!r} must be two numbers: the prompt's value outside and "
                "inside the mask, e.g. (0, 255) as released."
            )
        self.mask_prompt_values = (float(mask_prompt_values[0]), float(mask_prompt_values[1]))
        self.seed = seed
        if generator is None:
            generator = torch.Generator()
            if seed is not None:
                generator.manual_seed(seed)
            else:
                generator.seed()
        self.generator = generator

    # ----------------------------------------------------------------------------------------------- kind draw

    def sample_kind(self) -> str:
        """One of `"boxes"`, `"points"`, `"masks"` with the preset's probabilities."""
        index = torch.multinomial(self.probabilities, 1, generator=self.generator).item()
        return self.kinds[index]

    # --------------------------------------------------------------------------------------------------- boxes

    @staticmethod
    def tight_boxes(masks: torch.Tensor) -> torch.Tensor:
        """`(P, H, W)` labels -> `(P, 4)` float `[x0, y0, x1, y1]`: the first and last column and row (inclusive
        pixel indices) with a non-zero label in (0, 1], as the release's `masks_to_boxes` on its resized labels (soft
        edge pixels included). Every mask must have foreground."""
        return masks_to_boxes((masks > BACKGROUND) & labelled_pixels(masks))

    def noisy_boxes(self, boxes: torch.Tensor, size: int) -> torch.Tensor:
        """Jitter each coordinate by `N(0, (ratio x side)^2)` clipped to `box_noise_max` pixels, where side is the
        box width for x and its height for y, then clamp to the `size x size` image and keep `x0 <= x1`.

        `(P, 4)` -> `(P, 4)`."""
        sides = (boxes[:, 2:] - boxes[:, :2]).clamp_min(1.0).repeat(1, 2)  # (P, 4): w, h, w, h
        noise = torch.randn(boxes.shape, generator=self.generator) * self.box_noise_ratio * sides
        noisy = (boxes + noise.clamp(-self.box_noise_max, self.box_noise_max)).clamp(0, size - 1)
        low = torch.minimum(noisy[:, :2], noisy[:, 2:])
        high = torch.maximum(noisy[:, :2], noisy[:, 2:])
        return torch.cat([low, high], dim=1)

    # -------------------------------------------------------------------------------------------------- points

    def _sample_pixels(self, allowed: torch.Tensor, count: int) -> tuple[torch.Tensor, torch.Tensor]:
        """`count` random pixels per row of `allowed` `(P, H, W)` bool -> `(P, count, 2)` `[x, y]` and `(P,)` bool:
        rows with no allowed pixel (their points are meaningless)."""
        num, _, width = allowed.shape
        weights = allowed.flatten(1).float()
        empty = weights.sum(1) == 0
        weights[empty] = 1.0  # multinomial rejects all-zero rows; these points are replaced by padding
        # Distinct pixels where every row has enough of them, like the release; else with replacement.
        replacement = bool((weights.sum(1) < count).any())
        index = torch.multinomial(weights, count, replacement=replacement, generator=self.generator)
        coords = torch.stack([index % width, index // width], dim=-1).float()
        return coords, empty

    def points(self, masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Random points: `num_points` on the foreground (label 1), then `num_negative_points` on the background
        (label 0, never on ignored pixels).

        Args:
            masks (`torch.Tensor` of shape `(P, H, W)`): labels; positives on pixels above `FOREGROUND_THRESHOLD`
                (the release samples `label > 128` on 0..255), negatives on pixels labelled exactly 0.

        Returns:
            `input_points` `(P, N, 2)` float `[x, y]` pixel indices and `input_labels` `(P, N)` int64, with
            `N = num_points + num_negative_points`; negatives of masks without background are padding (-10).
        """
        coords, labels = [], []
        if self.num_points:
            positive, _ = self._sample_pixels(foreground_pixels(masks), self.num_points)
            coords.append(positive)
            labels.append(torch.ones(positive.shape[:2], dtype=torch.int64))
        if self.num_negative_points:
            negative, no_background = self._sample_pixels(masks == BACKGROUND, self.num_negative_points)
            negative_labels = torch.zeros(negative.shape[:2], dtype=torch.int64)
            negative[no_background] = DEFAULT_POINT_PAD_VALUE
            negative_labels[no_background] = DEFAULT_POINT_PAD_VALUE
            coords.append(negative)
            labels.append(negative_labels)
        return torch.cat(coords, dim=1), torch.cat(labels, dim=1)

    # --------------------------------------------------------------------------------------------------- masks

    def mask_targets(self, masks: torch.Tensor, size: int) -> torch.Tensor:
        """Ground truth at the mask-prompt size: `(P, H, W)` labels (hard or soft) -> `(P, size, size)` float in
        [0, 1] (bilinear, as the release; ignored pixels count as background)."""
        foreground = torch.where(labelled_pixels(masks), masks.float(), 0.0).unsqueeze(1)
        return F.interpolate(foreground, size=(size, size), mode="bilinear", align_corners=False).squeeze(1)

    def incoherent_band(self, targets: torch.Tensor) -> torch.Tensor:
        """Pixels where `targets` `(P, M, M)` differ by >= 0.01 from their down-(1/factor)-then-up-sampled copy:
        the band around the boundary where the noise goes. Returns `(P, M, M)` bool."""
        size = targets.shape[-1]
        small = F.interpolate(targets.unsqueeze(1), size=max(1, size // self.incoherent_factor), mode="bilinear")
        recovered = F.interpolate(small, size=(size, size), mode="bilinear").squeeze(1)
        return (targets - recovered).abs() >= INCOHERENT_THRESHOLD

    def noisy_masks(self, masks: torch.Tensor, size: int) -> torch.Tensor:
        """Noisy mask prompts: GT at `size` plus unit Gaussian noise inside the incoherent band, thresholded at 0.5,
        then given `mask_prompt_values` (0 / 255 as released).

        `(P, H, W)` labels -> `(P, size, size)` float with the two values of `mask_prompt_values`."""
        targets = self.mask_targets(masks, size)
        band = self.incoherent_band(targets)
        noise = torch.randn(targets.shape, generator=self.generator) * self.mask_noise_std
        outside, inside = self.mask_prompt_values
        return torch.where((targets + noise * band) > 0.5, inside, outside)

    # ---------------------------------------------------------------------------------------------------- batch

    def __call__(
        self, labels: torch.Tensor, valid: torch.Tensor | None = None, kind: str | None = None
    ) -> dict[str, torch.Tensor]:
        """Prompts for a batch.

        Args:
            labels (`torch.Tensor` of shape `(B, P, S, S)`): uint8 1 fg / 0 bg / 255 ignore, or float32 soft labels
                in [0, 1] with 255 ignore.
            valid (`torch.Tensor` of shape `(B, P)`, bool, *optional*): real instances; padded slots (False) get a
                dummy prompt made from a full-image mask (their labels are all ignored by the loss).
            kind (`str`, *optional*): force a prompt kind instead of drawing one.

        Returns:
            One of: `{"input_boxes": (B, P, 4) float}`, `{"input_points": (B, P, N, 2) float, "input_labels":
            (B, P, N) int64}`, `{"input_masks": (B, P, M, M) float}`.
        """
        if labels.ndim != 4 or labels.shape[-1] != labels.shape[-2]:
            raise ValueError(f"labels must have shape (B, P, S, S), got {tuple(labels.shape)}.")
        kind = kind or self.sample_kind()
        if kind not in PROMPT_KINDS:
            raise ValueError(f"kind={kind!r} is not one of {PROMPT_KINDS}.")
        batch, prompts, size = labels.shape[0], labels.shape[1], labels.shape[-1]
        masks = labels.reshape(batch * prompts, size, size)
        if valid is not None and not bool(valid.all()):
            masks = masks.clone()
            masks[~valid.reshape(-1)] = FOREGROUND
        if kind == "boxes":
            boxes = self.tight_boxes(masks)
            if self.box_noise:
                boxes = self.noisy_boxes(boxes, size)
            return {"input_boxes": boxes.reshape(batch, prompts, 4)}
        if kind == "points":
            coords, point_labels = self.points(masks)
            return {
                "input_points": coords.reshape(batch, prompts, -1, 2),
                "input_labels": point_labels.reshape(batch, prompts, -1),
            }
        mask_size = self.mask_prompt_size or size // 4
        return {"input_masks": self.noisy_masks(masks, mask_size).reshape(batch, prompts, mask_size, mask_size)}


__all__ = ["PRESETS", "PROMPT_KINDS", "RELEASE_MASK_PROMPT_VALUES", "PromptSimulator"]
