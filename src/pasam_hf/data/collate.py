"""Batching of training items: instance padding, prompt simulation, bad-sample removal.

A batch holds:

- `pixel_values` `(B, 3, S, S)` or `image_embeddings` `(B, C, h, w)` (items of the embedding cache), and
  `adapter_pixel_values` `(B, 4, A, A)`; any other tensor key every item has is stacked too;
- exactly one prompt kind, drawn once per batch (see [`PromptSimulator`]): `input_boxes` `(B, P, 4)`, or
  `input_points` `(B, P, N, 2)` + `input_labels` `(B, P, N)`, or `input_masks` `(B, P, M, M)`, in the `S x S` frame;
- `labels` `(B, P, S, S)` in the items' dtype: float32 soft labels in [0, 1] (the release's bilinear resize, the
  default) or uint8 1 fg / 0 bg, 255 ignore in both; padded instance slots are all 255 and get a harmless dummy
  prompt (from a full-image mask);
- `names` (`list[str]`), `skipped` (`list[str]`, names of bad samples dropped from this batch) and
  `skipped_details` (`list[dict]` with `name`, `kind`, `reason`).

A batch whose samples are all bad is `{"skipped": [...], "skipped_details": [...]}` only: the training loop skips
it (after giving it to [`BadSampleTracker.update`]).
"""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.data import get_worker_info

from .dataset import is_bad_sample, sample_report
from .prompts import PromptSimulator
from .records import IGNORE

IMAGE_KEYS = ("pixel_values", "image_embeddings")
_ITEM_KEYS = {"labels", "name", *IMAGE_KEYS}


class PASamDataCollator:
    """Collate items of [`PASamTrainingDataset`] (or of the embedding cache) into a training batch.

    Args:
        prompt_simulator ([`PromptSimulator`]): draws the batch's prompts (and the instance subsets).
        max_instances_per_image (`int`, defaults to 8): cap on instances per image; a random subset is kept when
            an image has more.
    """

    def __init__(self, prompt_simulator: PromptSimulator, max_instances_per_image: int = 8):
        if max_instances_per_image < 1:
            raise ValueError(f"max_instances_per_image={max_instances_per_image} must be at least 1.")
        self.prompt_simulator = prompt_simulator
        self.max_instances_per_image = max_instances_per_image
        self._worker_seed: int | None = None

    def _reseed_in_worker(self) -> None:
        """DataLoader workers receive copies of one generator state; give each worker (and each epoch's workers)
        its own stream, derived from torch's per-worker seed so that a seeded run stays reproducible."""
        worker = get_worker_info()
        if worker is not None and worker.seed != self._worker_seed:
            self._worker_seed = worker.seed
            base = self.prompt_simulator.seed or 0
            self.prompt_simulator.generator.manual_seed((worker.seed + base) % (1 << 63))

    def _select(self, labels: torch.Tensor) -> torch.Tensor:
        """At most `max_instances_per_image` instances of `(K, S, S)`, a random subset (in order) when more."""
        if labels.shape[0] <= self.max_instances_per_image:
            return labels
        keep = torch.randperm(labels.shape[0], generator=self.prompt_simulator.generator)
        return labels[keep[: self.max_instances_per_image].sort().values]

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        self._reseed_in_worker()
        report = sample_report(features)
        good = [item for item in features if not is_bad_sample(item)]
        if not good:
            return {key: report[key] for key in ("skipped", "skipped_details")}

        image_key = self._image_key(good)
        labels = [self._select(item["labels"]) for item in good]
        num_prompts = max(label.shape[0] for label in labels)
        size = labels[0].shape[-1]
        padded = torch.full((len(good), num_prompts, size, size), IGNORE, dtype=labels[0].dtype)
        valid = torch.zeros(len(good), num_prompts, dtype=torch.bool)
        for row, label in enumerate(labels):
            if tuple(label.shape[-2:]) != (size, size):
                raise ValueError(
                    f"labels of {good[row]['name']!r} are {tuple(label.shape[-2:])} but those of "
                    f"{good[0]['name']!r} are {(size, size)}; all items of a batch must come from one processor."
                )
            padded[row, : label.shape[0]] = label
            valid[row, : label.shape[0]] = True

        batch: dict[str, Any] = {image_key: torch.stack([item[image_key] for item in good])}
        shared_keys = set(good[0]).intersection(*good[1:]) - _ITEM_KEYS
        for key in sorted(shared_keys):
            if all(torch.is_tensor(item[key]) for item in good):
                batch[key] = torch.stack([item[key] for item in good])
        batch.update(self.prompt_simulator(padded, valid))
        batch["labels"] = padded
        batch.update(report)
        return batch

    @staticmethod
    def _image_key(items: list[dict[str, Any]]) -> str:
        """`"pixel_values"` or `"image_embeddings"`, the same for every item."""
        kinds = {key for item in items for key in IMAGE_KEYS if key in item}
        if len(kinds) != 1 or not all(next(iter(kinds)) in item for item in items):
            raise ValueError(
                f"every item of a batch must carry exactly one of {IMAGE_KEYS} (found {sorted(kinds) or 'none'}); "
                "do not mix cached embeddings with raw images in one dataset."
            )
        return kinds.pop()


__all__ = ["PASamDataCollator"]
