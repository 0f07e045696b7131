"""Embedding cache: the image encoder is frozen during PA-SAM fine-tuning, so its output for an augmented view never
changes. Computing it once per view and training the decoder from the cache removes the encoder (about 90% of a
training step's compute with ViT-B, more with ViT-L/H) from every step.

Layout of a cache directory:

- `cache.json`: format version, the encoder fingerprint, input sizes, the number of records and the bad samples
  left out (`bad_samples`: `name`, `kind`, `reason`), and one entry per view (`name`, `view`, `shard`, `key`);
- `shard_00000.safetensors`, ...: per view `<key>.image_embeddings` `(C, h, w)` (float16 by default),
  `<key>.adapter_pixel_values` `(4, A, A)` and `<key>.labels` `(K, S, S)`: the dataset's soft labels (values in
  [0, 1], 255 ignored) as float16, or its hard uint8 labels (1 foreground, 0 background, 255 ignored).

Prompts are not cached: they are drawn from the labels at training time, as without the cache.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from ..modeling_pasam import PASamModel
from ..processing_pasam import PASamProcessor

CACHE_FORMAT = 1
INDEX_FILE = "cache.json"


class EmbeddingCacheError(ValueError):
    """The cache is missing, incomplete or was made with another image encoder."""


def encoder_fingerprint(model: PASamModel) -> str:
    """A short hash of the image encoder's configuration and weights: a cache is valid only for the same encoder."""
    digest = hashlib.sha256()
    digest.update(json.dumps(model.config.vision_config.to_dict(), sort_keys=True, default=str).encode())
    for name, tensor in sorted(model.vision_encoder.state_dict().items()):
        digest.update(name.encode())
        # A few statistics per tensor are enough to tell checkpoints apart without hashing gigabytes.
        values = tensor.detach().float().flatten()
        stride = max(1, values.numel() // 64)
        digest.update(torch.stack([values.sum(), values.abs().sum(), values[::stride].sum()]).numpy().tobytes())
    return digest.hexdigest()[:16]


@torch.inference_mode()
def build_embedding_cache(
    model: PASamModel,
    processor: PASamProcessor,
    records: Iterable,
    output_dir: str | os.PathLike,
    *,
    views_per_image: int = 4,
    augment: bool = True,
    seed: int = 0,
    batch_size: int = 4,
    shard_size: int = 64,
    dtype: torch.dtype = torch.float16,
    max_bad_fraction: float = 0.1,
    progress: bool = True,
    label_interpolation: str = "bilinear",
) -> Path:
    """Encode `views_per_image` augmented views of every record and write them to `output_dir`.

    The views are those [`PASamTrainingDataset`] produces for epochs `0 .. views_per_image - 1` with `seed`, so a
    cached run sees the same augmentations a run with the encoder would see in its first epochs. The directory is
    written under a temporary name and renamed when complete, so an interrupted build leaves no half cache.
    `label_interpolation` is the dataset's (`"bilinear"`: the release's soft labels; `"nearest"`: hard labels); the
    cache records it, and a run asking for the other kind is refused.

    Samples that cannot be used (unreadable file, mask without foreground...) are left out and listed with their
    reason in `cache.json` (`bad_samples`, read back by [`EmbeddingCacheDataset.bad_samples`]); the rule of
    training applies: more than `max_bad_fraction` of them raises [`DataQualityError`] and writes no cache.

    Returns:
        `Path` of the cache directory.
    """
    from ..data import BadSampleTracker, DataQualityError, PASamTrainingDataset, is_bad_sample, sample_report

    if views_per_image < 1:
        raise ValueError(f"views_per_image must be >= 1, got {views_per_image}.")
    output_dir = Path(output_dir)
    if (output_dir / INDEX_FILE).exists():
        raise EmbeddingCacheError(f"{output_dir} already holds an embedding cache; remove it or choose another --out.")
    staging = output_dir.with_name(output_dir.name + ".incomplete")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)

    model.eval()
    device = next(model.parameters()).device
    dataset = PASamTrainingDataset(
        records, processor, augment=augment, seed=seed, label_interpolation=label_interpolation
    )
    entries: list[dict] = []
    shard: dict[str, torch.Tensor] = {}
    # Bad samples are the same in every view (an empty crop falls back to the un-augmented geometry): count view 0.
    bad_samples = BadSampleTracker(max_fraction=max_bad_fraction)
    bar = tqdm(total=views_per_image * len(dataset), disable=not progress, desc="caching embeddings", unit="view")

    def flush() -> None:
        if shard:
            shard_index = entries[-1]["shard"]
            save_file(shard, str(staging / f"shard_{shard_index:05d}.safetensors"))
            shard.clear()

    for view in range(views_per_image):
        dataset.set_epoch(view)
        for start in range(0, len(dataset), batch_size):
            items = [dataset[index] for index in range(start, min(start + batch_size, len(dataset)))]
            good = [item for item in items if not is_bad_sample(item)]
            if view == 0:
                bad_samples.add(sample_report(items))
                # As in training: checked once enough samples were seen, exactly at the end of the pass.
                if bad_samples.exceeds(complete=start + batch_size >= len(dataset)):
                    bar.close()
                    shutil.rmtree(staging, ignore_errors=True)
                    raise DataQualityError(bad_samples.message())
            bar.update(len(items))
            if not good:
                continue
            pixel_values = torch.stack([item["pixel_values"] for item in good]).to(device, model.dtype)
            embeddings = model.get_image_embeddings(pixel_values).to("cpu", dtype)
            for item, embedding in zip(good, embeddings):
                key = str(len(entries))
                shard_index = len(entries) // shard_size
                shard[f"{key}.image_embeddings"] = embedding.contiguous()
                shard[f"{key}.adapter_pixel_values"] = item["adapter_pixel_values"].to(dtype).contiguous()
                labels = item["labels"]
                # Soft labels (the default, bilinear) in float16 like the embeddings: half the disk of float32.
                labels = labels if labels.dtype == torch.uint8 else labels.to(torch.float16)
                shard[f"{key}.labels"] = labels.contiguous()
                entries.append({"name": item["name"], "view": view, "shard": shard_index, "key": key})
                if len(entries) % shard_size == 0:
                    flush()
    flush()
    bar.close()
    if not entries:
        shutil.rmtree(staging, ignore_errors=True)
        raise EmbeddingCacheError("no usable sample to cache: every record was unreadable or had no object mask.")
    index = {
        "format": CACHE_FORMAT,
        "encoder_fingerprint": encoder_fingerprint(model),
        "image_size": model.config.vision_config.image_size,
        "views_per_image": views_per_image,
        "seed": seed,
        "augment": augment,
        "label_interpolation": label_interpolation,
        "dtype": str(dtype).removeprefix("torch."),
        "num_records": len(dataset),
        "bad_samples": bad_samples.details,
        "entries": entries,
    }
    (staging / INDEX_FILE).write_text(json.dumps(index))
    if output_dir.exists():
        output_dir.rmdir()  # an empty directory the user created; anything else was refused above
    os.replace(staging, output_dir)
    return output_dir


class EmbeddingCacheDataset(Dataset):
    """Items of a cache written by [`build_embedding_cache`]: dicts with `image_embeddings` `(C, h, w)`,
    `adapter_pixel_values` `(4, A, A)` (float32), `labels` `(K, S, S)` (float16 soft or uint8 hard) and `name`, as
    [`PASamDataCollator`] takes them.

    One item per image, as a dataset of the images would have: epoch `e` (`set_epoch(e)`) gives view
    `e % views_per_image` of each image, so an epoch means the same with and without the cache, and the first
    `views_per_image` epochs see the augmentations a run with the encoder would see. An image whose view `v` could
    not be cached (every instance cropped away) gives another of its views instead.

    `label_interpolation`, when given, must be the one the cache was built with (caches of earlier versions hold
    hard, `"nearest"` labels)."""

    def __init__(
        self, cache_dir: str | os.PathLike, model: PASamModel | None = None, label_interpolation: str | None = None
    ):
        self.cache_dir = Path(cache_dir)
        index_path = self.cache_dir / INDEX_FILE
        if not index_path.is_file():
            raise EmbeddingCacheError(
                f"{self.cache_dir} is not an embedding cache (no {INDEX_FILE}); build one with `pasam cache`."
            )
        self.index = json.loads(index_path.read_text())
        if self.index.get("format") != CACHE_FORMAT:
            raise EmbeddingCacheError(
                f"{self.cache_dir} is a cache of format {self.index.get('format')}, this version reads "
                f"{CACHE_FORMAT}; rebuild it with `pasam cache`."
            )
        if model is not None:
            self.check_model(model)
        self.label_interpolation = self.index.get("label_interpolation", "nearest")
        if label_interpolation is not None and label_interpolation != self.label_interpolation:
            raise EmbeddingCacheError(
                f"the embedding cache {self.cache_dir} holds {self.label_interpolation} labels but "
                f"--label-interpolation is {label_interpolation}; rebuild it with `pasam cache "
                f"--label-interpolation {label_interpolation}` or train with --label-interpolation "
                f"{self.label_interpolation}."
            )
        self.entries = self.index["entries"]
        # Per image (in the order of the cache), its entries by view.
        views: dict[str, dict[int, int]] = {}
        for position, entry in enumerate(self.entries):
            views.setdefault(entry["name"], {})[int(entry.get("view", 0))] = position
        self._views = list(views.values())
        self.views_per_image = int(self.index.get("views_per_image", 1))
        self.epoch = 0
        self._handles: dict[int, object] = {}

    def check_model(self, model: PASamModel) -> None:
        """Refuse to train a model whose image encoder is not the one that made the cache."""
        if encoder_fingerprint(model) != self.index["encoder_fingerprint"]:
            raise EmbeddingCacheError(
                f"the embedding cache {self.cache_dir} was made with another image encoder than the model being "
                "trained; rebuild it with `pasam cache --model <the same model>`."
            )

    def set_epoch(self, epoch: int) -> None:
        """Give view `epoch % views_per_image` of every image (call at the start of every epoch)."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self._views)

    def __getitem__(self, index: int) -> dict:
        views = self._views[index]
        view = self.epoch % self.views_per_image
        entry = self.entries[views[view] if view in views else views[sorted(views)[view % len(views)]]]
        handle = self._handles.get(entry["shard"])
        if handle is None:
            # One memory-mapped handle per shard and worker process.
            handle = safe_open(str(self.cache_dir / f"shard_{entry['shard']:05d}.safetensors"), framework="pt")
            self._handles[entry["shard"]] = handle
        key = entry["key"]
        return {
            "image_embeddings": handle.get_tensor(f"{key}.image_embeddings").float(),
            "adapter_pixel_values": handle.get_tensor(f"{key}.adapter_pixel_values").float(),
            "labels": handle.get_tensor(f"{key}.labels"),
            "name": entry["name"],
        }

    def __getstate__(self) -> dict:
        # File handles do not cross into DataLoader worker processes; each worker opens its own.
        state = self.__dict__.copy()
        state["_handles"] = {}
        return state

    @property
    def bad_samples(self) -> list[dict[str, str]]:
        """The samples left out of the cache because they could not be used: `[{"name", "kind", "reason"}]`."""
        if "bad_samples" in self.index:
            return list(self.index["bad_samples"])
        # Caches of earlier versions kept the names only, once per view.
        return [
            {"name": name, "kind": "unknown", "reason": "left out of the cache"}
            for name in dict.fromkeys(self.index.get("skipped", []))
        ]

    @property
    def num_records(self) -> int:
        """How many samples the cached data held, the bad ones included."""
        if "num_records" in self.index:
            return int(self.index["num_records"])
        return len({entry["name"] for entry in self.entries}) + len(self.bad_samples)


__all__ = ["EmbeddingCacheDataset", "EmbeddingCacheError", "build_embedding_cache", "encoder_fingerprint"]
