"""Torch datasets yielding augmented, preprocessed training samples.

An item is either a sample

    {"pixel_values": (3, S, S) float, "adapter_pixel_values": (4, A, A) float, "labels": (K, S, S), "name": str}

with float32 soft labels by default (the release's bilinear label resize: values in [0, 1], fractional at object
edges, 255 ignore) or uint8 hard labels 1 fg / 0 bg / 255 ignore with `label_interpolation="nearest"`,

or, for a sample that cannot be used (unreadable file, mask without foreground...), a bad-sample marker

    {"name": str, "bad_sample": reason, "bad_kind": "image" | "mask" | "row" | "empty"}

which [`PASamDataCollator`] drops and reports in `batch["skipped"]`, so one broken file never stops a run.

Randomness: the augmentation of item `index` is drawn from `numpy.random.default_rng((seed, epoch, index))`,
so it is reproducible whatever the number of DataLoader workers. Call `dataset.set_epoch(epoch)` at the start of
every epoch (the `Trainer` / `accelerate` do when the dataset has `set_epoch`) to get new augmentations each epoch.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, IterableDataset, get_worker_info

from .augmentation import LargeScaleJitter, resize_longest
from .records import SegmentationRecord, foreground_pixels
from .sources import BadSampleError, RecordSequence, as_record_sequence

BAD_SAMPLE_KEY = "bad_sample"
# Large-scale jitter may crop every instance away; draw again this many times before using the evaluation geometry.
MAX_CROP_ATTEMPTS = 10


def bad_sample(name: str, reason: str, kind: str) -> dict[str, str]:
    """The marker item of a sample that cannot be used."""
    return {"name": name, BAD_SAMPLE_KEY: reason, "bad_kind": kind}


def is_bad_sample(item: dict[str, Any]) -> bool:
    """Whether a dataset item is a bad-sample marker."""
    return BAD_SAMPLE_KEY in item


def sample_report(items: list[dict[str, Any]]) -> dict[str, list]:
    """What `items` count for the bad-sample report ([`BadSampleTracker.add`]): `names` of the usable ones,
    `skipped` names and `skipped_details` (`name`, `kind`, `reason`) of the bad-sample markers."""
    bad = [item for item in items if is_bad_sample(item)]
    return {
        "names": [item["name"] for item in items if not is_bad_sample(item)],
        "skipped": [item["name"] for item in bad],
        "skipped_details": [
            {"name": item["name"], "kind": item.get("bad_kind", "unreadable"), "reason": item[BAD_SAMPLE_KEY]}
            for item in bad
        ],
    }


def input_size(image_processor: Any) -> int:
    """The model's square input side `S`, from the image processor's `size["longest_edge"]`."""
    size = image_processor.size
    longest = size.get("longest_edge") if isinstance(size, dict) else getattr(size, "longest_edge", None)
    if not longest:
        raise ValueError(
            f"the image processor's size {size} has no longest_edge; build the processor with "
            "PASamProcessor.from_model_config(config) so that it matches the model."
        )
    return int(longest)


class SamplePreparer:
    """Record -> training item: augmentation (or SAM's resize), then the processor (which then only normalises, and
    pads un-augmented images).

    Args:
        processor: a [`PASamProcessor`] or its image processor.
        augment (`bool`): large-scale jitter + flip when `True`, the evaluation geometry when `False`.
        scale_range, flip_probability, label_interpolation: see [`LargeScaleJitter`].
    """

    def __init__(
        self,
        processor: Any,
        augment: bool = True,
        scale_range: tuple[float, float] = (0.1, 2.0),
        flip_probability: float = 0.5,
        label_interpolation: str = "bilinear",
    ):
        self.image_processor = getattr(processor, "image_processor", processor)
        self.size = input_size(self.image_processor)
        self.augment = augment
        self.jitter = LargeScaleJitter(
            self.size,
            scale_range=scale_range,
            flip_probability=flip_probability,
            label_interpolation=label_interpolation,
        )

    def geometry(
        self, record: SegmentationRecord, generator: np.random.Generator
    ) -> tuple[np.ndarray, np.ndarray]:
        """`(image (h, w, 3) uint8, instances (K', S, S))` keeping only instances with foreground left (labels above
        `FOREGROUND_THRESHOLD`; float32 soft or uint8 hard labels, see [`LargeScaleJitter`]).

        Augmented images are `S x S` (large-scale jitter pads them with 128, as the release). Without augmentation
        (or when every jittered crop lost every instance) the image keeps SAM's inference geometry: longest side
        `S`, not padded here, so the image processor pads the *normalised* image with 0 as it does at inference;
        the masks are padded with background to `S x S`."""
        image = np.asarray(record.image)
        if self.augment:
            for _ in range(MAX_CROP_ATTEMPTS):
                out_image, out_masks = self.jitter(image, record.instances, generator)
                keep = foreground_pixels(out_masks).any(axis=(1, 2))
                if keep.any():
                    return out_image, out_masks[keep]
        out_image, out_masks = resize_longest(image, record.instances, self.size, self.jitter.label_interpolation)
        height, width = out_masks.shape[1:]
        padded = np.full(
            (out_masks.shape[0], self.size, self.size), self.jitter.mask_pad_value, dtype=out_masks.dtype
        )
        padded[:, :height, :width] = out_masks
        return out_image, padded[foreground_pixels(padded).any(axis=(1, 2))]

    def __call__(self, record: SegmentationRecord, generator: np.random.Generator) -> dict[str, Any]:
        if record.num_instances == 0:
            return bad_sample(record.name, "the mask has no foreground pixel (no instance to train on)", "empty")
        image, masks = self.geometry(record, generator)
        if masks.shape[0] == 0:
            return bad_sample(
                record.name, f"every instance is too small to survive resizing to {self.size}x{self.size}", "empty"
            )
        encoding = self.image_processor(images=image, return_tensors="pt")
        pixel_values = encoding["pixel_values"][0]
        if tuple(pixel_values.shape[-2:]) != (self.size, self.size) or tuple(
            encoding["reshaped_input_sizes"][0].tolist()
        ) != tuple(image.shape[:2]):
            # The processor resized the image: labels would no longer line up with pixel_values.
            raise ValueError(
                f"the image processor turned a {image.shape[1]}x{image.shape[0]} image (longest side {self.size}) "
                f"into pixel_values of shape {tuple(pixel_values.shape)}; its size (longest_edge) and pad_size must "
                f"both be {self.size}. Build it with PASamProcessor.from_model_config(config)."
            )
        return {
            "pixel_values": pixel_values,
            "adapter_pixel_values": encoding["adapter_pixel_values"][0],
            "labels": torch.from_numpy(np.ascontiguousarray(masks)),
            "name": record.name,
        }


class _EpochMixin:
    seed: int
    epoch: int = 0

    def set_epoch(self, epoch: int) -> None:
        """Draw the augmentations of epoch `epoch` (call at the start of every epoch)."""
        self.epoch = int(epoch)

    def _generator(self, index: int) -> np.random.Generator:
        return np.random.default_rng((self.seed, self.epoch, index))


class PASamTrainingDataset(_EpochMixin, Dataset):
    """Map-style training dataset over records (a [`RecordSequence`] from [`load_records`], or a list).

    Args:
        records: the samples; decoded lazily when they are a [`RecordSequence`].
        processor: a [`PASamProcessor`] matching the model (`PASamProcessor.from_model_config(config)`).
        augment (`bool`, defaults to `True`): flip + large-scale jitter; `False` for the evaluation geometry.
        seed (`int`, defaults to 0): augmentation seed (see the module docstring).
        scale_range (`tuple[float, float]`, defaults to `(0.1, 2.0)`): see [`LargeScaleJitter`].
        flip_probability (`float`, defaults to 0.5): see [`LargeScaleJitter`].
        label_interpolation (`str`, defaults to `"bilinear"`): `"bilinear"` resizes masks as the release (float32
            soft labels, fractional at object edges, used as soft targets by the loss); `"nearest"` keeps hard
            uint8 0 / 1 / 255 labels (the cleaner choice for new training, see docs/architecture.md).
    """

    def __init__(
        self,
        records: Sequence[SegmentationRecord] | RecordSequence,
        processor: Any,
        *,
        augment: bool = True,
        seed: int = 0,
        scale_range: tuple[float, float] = (0.1, 2.0),
        flip_probability: float = 0.5,
        label_interpolation: str = "bilinear",
    ):
        self.records = as_record_sequence(records)
        self.prepare = SamplePreparer(processor, augment, scale_range, flip_probability, label_interpolation)
        self.seed = seed
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict[str, Any]:
        try:
            record = self.records[index]
        except BadSampleError as error:
            return bad_sample(error.name, error.reason, error.kind)
        return self.prepare(record, self._generator(index))


class PASamIterableTrainingDataset(_EpochMixin, IterableDataset):
    """Iterable training dataset for streamed sources ([`IterableRecords`] from `load_records(..., streaming=True)`
    or any iterable of records). With several DataLoader workers, worker `i` of `n` takes samples `i, i + n, ...`.

    Arguments as [`PASamTrainingDataset`].
    """

    def __init__(
        self,
        records: Iterable[SegmentationRecord],
        processor: Any,
        *,
        augment: bool = True,
        seed: int = 0,
        scale_range: tuple[float, float] = (0.1, 2.0),
        flip_probability: float = 0.5,
        label_interpolation: str = "bilinear",
    ):
        self.records = records
        self.prepare = SamplePreparer(processor, augment, scale_range, flip_probability, label_interpolation)
        self.seed = seed
        self.epoch = 0

    def _samples(self, shard: int, num_shards: int) -> Iterator[tuple[int, SegmentationRecord | BadSampleError]]:
        if hasattr(self.records, "iter_samples"):
            # Sources that can skip rows before decoding them: each worker decodes only its own rows.
            samples = self.records.iter_samples(shard, num_shards)
            yield from ((shard + position * num_shards, sample) for position, sample in enumerate(samples))
            return
        for index, record in enumerate(self.records):
            if index % num_shards == shard:
                yield index, record

    def __iter__(self) -> Iterator[dict[str, Any]]:
        worker = get_worker_info()
        shard, num_shards = (worker.id, worker.num_workers) if worker is not None else (0, 1)
        for index, sample in self._samples(shard, num_shards):
            if isinstance(sample, BadSampleError):
                yield bad_sample(sample.name, sample.reason, sample.kind)
            else:
                yield self.prepare(sample, self._generator(index))


__all__ = [
    "PASamIterableTrainingDataset",
    "PASamTrainingDataset",
    "SamplePreparer",
    "bad_sample",
    "input_size",
    "is_bad_sample",
    "sample_report",
]
