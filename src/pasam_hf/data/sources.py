"""Data sources: a user's data -> [`SegmentationRecord`]s, decoded lazily.

Two kinds of sources:

- `datasets` datasets: a `datasets.Dataset` / `IterableDataset` (or a dict of splits), a directory written by
  `save_to_disk`, a local directory or script `datasets.load_dataset` reads, or a Hub id. Image and mask columns are
  configurable; `streaming=True` reads datasets larger than memory.
- Folders of files: `images/` + `masks/` or the HQSeg-44K / DIS `im/` + `gt/` preset (or any `(image_dir,
  mask_dir)` pair), matched by file stem. A root whose sub-folders each hold such a layout gives one subset per
  sub-folder (`record.subset`), e.g. HQSeg-44K val: DIS-VD, ThinObject5K-TE, COIFT, HRSOD.

Random-access sources are [`RecordSequence`]s (`len()`, `[index]`), usable by a map-style dataset; streaming
sources are [`IterableRecords`]. Iterating either yields records and skips samples whose files cannot be decoded
(with a warning); `RecordSequence[index]` raises [`BadSampleError`] for them instead, which
[`PASamTrainingDataset`] turns into a bad-sample marker.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import PIL.Image

from ..validation import to_rgb_uint8
from .masks import InstanceMode, MaskFormat, MaskSizeError, decode_mask, open_image_source
from .records import SegmentationRecord

LAYOUT_PRESETS = {"images-masks": ("images", "masks"), "im-gt": ("im", "gt")}
MASK_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".gif")
# How many file names a warning or error lists.
_NAMES_SHOWN = 5
# How deep below the root sub-folders holding a layout are searched for.
_MAX_SUBSET_DEPTH = 3

Layout = Literal["auto", "images-masks", "im-gt"] | tuple[str, str]


class BadSampleError(Exception):
    """A sample that cannot be used: unreadable or corrupt file, mask not matching its image, ...

    Attributes:
        name (`str`): the sample's name.
        reason (`str`): what is wrong, for reports.
        kind (`str`): short category for counts: `"image"`, `"mask"`, `"row"` (a dataset row that cannot be
            read), `"empty"` (no foreground).
    """

    def __init__(self, name: str, reason: str, kind: str = "unreadable"):
        super().__init__(f"{name}: {reason}")
        self.name = name
        self.reason = reason
        self.kind = kind


@dataclass(frozen=True)
class DecodeOptions:
    """How masks are turned into instances (see [`decode_mask`])."""

    mask_format: MaskFormat = "auto"
    void_value: int | None = 255
    instance_mode: InstanceMode = "binary"
    resize_masks: bool = False
    # Messages name the `pasam` command line's flags (load_records_from_flags) rather than Python arguments.
    cli: bool = False

    def decode(self, name: str, image: Any, mask: Any, subset: str = "") -> SegmentationRecord:
        """Decode one image/mask pair; any failure becomes a [`BadSampleError`] naming the sample (and its file)."""
        try:
            image = _array_if_nested_list(image)
            if isinstance(image, (bytes, bytearray, dict)):
                image = open_image_source(image, f"image of {name}")
            pixels = to_rgb_uint8(image, f"image of {name}")
        except Exception as error:  # noqa: BLE001 - any decoding failure makes this one sample unusable, not the run
            raise BadSampleError(name, str(error), "image") from error
        pil_image = PIL.Image.fromarray(pixels)
        mask_name = f"mask of {name}" + (f" ({os.fspath(mask)!r})" if isinstance(mask, (str, os.PathLike)) else "")
        try:
            instances = decode_mask(
                _array_if_nested_list(mask),
                image_size=pil_image.size,
                mask_format=self.mask_format,
                void_value=self.void_value,
                instance_mode=self.instance_mode,
                resize_masks=self.resize_masks,
                name=mask_name,
            )
        except MaskSizeError as error:
            option = "--resize-masks" if self.cli else "resize_masks=True"
            raise BadSampleError(name, str(error.naming(option)), "mask") from error
        except Exception as error:  # noqa: BLE001 - as above
            raise BadSampleError(name, str(error), "mask") from error
        return SegmentationRecord(name=name, image=pil_image, instances=instances, subset=subset)


def _array_if_nested_list(value: Any) -> Any:
    """`datasets` returns array columns (`List(List(Value(...)))` features, e.g. from `Dataset.from_dict` with numpy
    arrays) as nested Python lists: give them back their array form."""
    return np.asarray(value) if isinstance(value, (list, tuple)) else value


class RecordSequence(Sequence[SegmentationRecord]):
    """Random access to records; `self[index]` decodes one sample (raising [`BadSampleError`] when it cannot)."""

    def sample_name(self, index: int) -> str:
        """Name of sample `index` without decoding it (for bad-sample reports)."""
        raise NotImplementedError

    def __iter__(self) -> Iterator[SegmentationRecord]:
        for index in range(len(self)):
            try:
                yield self[index]
            except BadSampleError as error:
                warnings.warn(f"skipping bad sample {error}", stacklevel=2)


class FolderRecords(RecordSequence):
    """Image/mask file pairs (see [`find_folder_pairs`]), decoded on access."""

    def __init__(self, pairs: list[tuple[Path, Path, str]], options: DecodeOptions, root: Path):
        self.pairs = pairs
        self.options = options
        self.root = root

    def __len__(self) -> int:
        return len(self.pairs)

    def sample_name(self, index: int) -> str:
        image_path, _, subset = self.pairs[index]
        return f"{subset}/{image_path.stem}" if subset else image_path.stem

    def __getitem__(self, index: int) -> SegmentationRecord:  # type: ignore[override]
        image_path, mask_path, subset = self.pairs[index]
        return self.options.decode(self.sample_name(index), image_path, mask_path, subset)

    @property
    def subsets(self) -> list[str]:
        """Sub-folder names, in order of first appearance (`[""]` for a single layout)."""
        return list(dict.fromkeys(subset for _, _, subset in self.pairs))


class DatasetRecords(RecordSequence):
    """Rows of a `datasets.Dataset`, decoded on access."""

    def __init__(self, dataset: Any, image_column: str, mask_column: str, options: DecodeOptions, split: str):
        self.dataset = _undecoded(dataset, (image_column, mask_column))
        self.image_column = image_column
        self.mask_column = mask_column
        self.options = options
        self.split = split

    def __len__(self) -> int:
        return len(self.dataset)

    def sample_name(self, index: int) -> str:
        return f"{self.split}[{index}]"

    def __getitem__(self, index: int) -> SegmentationRecord:  # type: ignore[override]
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} is out of range for {len(self)} records")
        name = self.sample_name(index)
        try:
            row = self.dataset[index]
        except Exception as error:  # noqa: BLE001 - a row that cannot be read is one bad sample
            raise BadSampleError(name, f"row cannot be read ({error})", "row") from error
        return self.options.decode(name, row[self.image_column], row[self.mask_column])


class IterableRecords(Iterable[SegmentationRecord]):
    """Rows of a streamed `datasets.IterableDataset`, decoded while iterating."""

    def __init__(self, dataset: Any, image_column: str, mask_column: str, options: DecodeOptions, split: str):
        self.dataset = _undecoded(dataset, (image_column, mask_column))
        self.image_column = image_column
        self.mask_column = mask_column
        self.options = options
        self.split = split

    def iter_samples(self, shard_index: int = 0, num_shards: int = 1) -> Iterator[SegmentationRecord | BadSampleError]:
        """Records, or the [`BadSampleError`] of rows that cannot be decoded; only rows `index % num_shards ==
        shard_index` are decoded (one shard per DataLoader worker)."""
        for index, row in enumerate(self.dataset):
            if index % num_shards != shard_index:
                continue
            name = f"{self.split}[{index}]"
            try:
                yield self.options.decode(name, row[self.image_column], row[self.mask_column])
            except BadSampleError as error:
                yield error

    def __iter__(self) -> Iterator[SegmentationRecord]:
        for sample in self.iter_samples():
            if isinstance(sample, BadSampleError):
                warnings.warn(f"skipping bad sample {sample}", stacklevel=2)
                continue
            yield sample


# ------------------------------------------------------------------------------------------------------- folders


def _image_extensions() -> set[str]:
    return {ext.lower() for ext in PIL.Image.registered_extensions()}


def _files_by_stem(folder: Path, extensions: set[str] | tuple[str, ...]) -> tuple[dict[str, Path], list[str]]:
    """`{stem: path}` of the files of `folder` with one of `extensions`, and the names of duplicate stems."""
    files: dict[str, Path] = {}
    duplicates = []
    for path in sorted(folder.iterdir()):
        if path.is_file() and path.suffix.lower() in extensions:
            if path.stem in files:
                duplicates.append(path.name)
                continue
            files[path.stem] = path
    return files, duplicates


def _resolve_layout(layout: Layout) -> list[tuple[str, str]]:
    if isinstance(layout, tuple):
        if len(layout) != 2 or not all(isinstance(part, str) for part in layout):
            raise ValueError(f"layout={layout!r}: a custom layout is a pair (image_folder, mask_folder) of names.")
        return [layout]
    if layout == "auto":
        return list(LAYOUT_PRESETS.values())
    if layout not in LAYOUT_PRESETS:
        raise ValueError(
            f"layout={layout!r} is not one of 'auto', {', '.join(map(repr, LAYOUT_PRESETS))}, or a pair "
            "(image_folder, mask_folder)."
        )
    return [LAYOUT_PRESETS[layout]]


def _layout_in(folder: Path, candidates: list[tuple[str, str]]) -> tuple[str, str] | None:
    for image_dir, mask_dir in candidates:
        if (folder / image_dir).is_dir() and (folder / mask_dir).is_dir():
            return image_dir, mask_dir
    return None


def find_folder_pairs(root: str | os.PathLike, layout: Layout = "auto") -> list[tuple[Path, Path, str]]:
    """Image/mask pairs under `root`, matched by file stem.

    Args:
        root: A folder holding a layout (`images/` + `masks/`, `im/` + `gt/`, or the given pair), or whose
            sub-folders (up to 3 levels deep) hold one each; each such sub-folder is a subset named by its path
            relative to `root` (e.g. `"DIS-VD"`).
        layout: `"auto"` (either preset), `"images-masks"`, `"im-gt"`, or `(image_folder, mask_folder)`.

    Returns:
        `[(image_path, mask_path, subset), ...]` sorted by subset then stem. Files without a partner are reported
        in one warning (count and first names).
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"data folder {str(root)!r} does not exist; check the path.")
    candidates = _resolve_layout(layout)
    layouts: list[tuple[Path, tuple[str, str]]] = []
    found = _layout_in(root, candidates)
    if found:
        layouts.append((root, found))
    else:
        frontier = [root]
        for _ in range(_MAX_SUBSET_DEPTH):
            children = [child for folder in frontier for child in sorted(folder.iterdir()) if child.is_dir()]
            frontier = []
            for child in children:
                found = _layout_in(child, candidates)
                if found:
                    layouts.append((child, found))
                else:
                    frontier.append(child)
    if not layouts:
        expected = " or ".join(f"{image_dir}/ + {mask_dir}/" for image_dir, mask_dir in candidates)
        raise FileNotFoundError(
            f"no image/mask folders in {str(root)!r}: expected {expected} in it or in its sub-folders (one per "
            "subset). Pass layout=(image_folder, mask_folder) for other names."
        )

    image_extensions = _image_extensions()
    pairs: list[tuple[Path, Path, str]] = []
    unmatched: list[str] = []
    counts = {"images": 0, "masks": 0}
    for folder, (image_dir, mask_dir) in layouts:
        subset = "" if folder == root else folder.relative_to(root).as_posix()
        images, image_duplicates = _files_by_stem(folder / image_dir, image_extensions)
        masks, mask_duplicates = _files_by_stem(folder / mask_dir, MASK_EXTENSIONS)
        counts["images"] += len(images)
        counts["masks"] += len(masks)
        for stem in sorted(images):
            if stem in masks:
                pairs.append((images[stem], masks[stem], subset))
        prefix = f"{subset}/" if subset else ""
        unmatched += [f"{prefix}{image_dir}/{images[stem].name}" for stem in sorted(images.keys() - masks.keys())]
        unmatched += [f"{prefix}{mask_dir}/{masks[stem].name}" for stem in sorted(masks.keys() - images.keys())]
        unmatched += [f"{prefix}{image_dir}/{name} (same stem as another image)" for name in image_duplicates]
        unmatched += [f"{prefix}{mask_dir}/{name} (same stem as another mask)" for name in mask_duplicates]
    if not pairs:
        raise FileNotFoundError(
            f"no image/mask pairs in {str(root)!r}: found {counts['images']} images and {counts['masks']} masks "
            f"but no mask has the file stem of an image (e.g. images/cat.jpg + masks/cat.png). Mask extensions: "
            f"{', '.join(MASK_EXTENSIONS)}."
        )
    if unmatched:
        shown = ", ".join(unmatched[:_NAMES_SHOWN]) + (", ..." if len(unmatched) > _NAMES_SHOWN else "")
        warnings.warn(
            f"{len(unmatched)} files in {str(root)!r} have no partner and are not used: {shown}", stacklevel=3
        )
    return pairs


def _looks_like_folder_layout(root: Path, layout: Layout) -> bool:
    candidates = _resolve_layout(layout)
    if _layout_in(root, candidates):
        return True
    frontier = [root]
    for _ in range(_MAX_SUBSET_DEPTH):
        frontier = [child for folder in frontier for child in folder.iterdir() if child.is_dir()]
        if any(_layout_in(child, candidates) for child in frontier):
            return True
    return False


# ------------------------------------------------------------------------------------------------------ datasets


def _undecoded(dataset: Any, columns: tuple[str, ...]) -> Any:
    """Cast `Image` columns to `Image(decode=False)`: decoding then happens per sample in our code, so a corrupt
    file is one bad sample with its name instead of an exception inside `datasets`."""
    import datasets

    features = dataset.features
    for column in columns:
        if features is not None and isinstance(features.get(column), datasets.Image) and features[column].decode:
            dataset = dataset.cast_column(column, datasets.Image(decode=False))
    return dataset


def _column_names(dataset: Any) -> list[str] | None:
    names = getattr(dataset, "column_names", None)
    if names is None and getattr(dataset, "features", None) is not None:
        names = list(dataset.features)
    return names


def _check_columns(dataset: Any, image_column: str, mask_column: str, cli: bool = False) -> None:
    names = _column_names(dataset)
    if names is None:  # a streamed dataset without known features: look at the first row
        first = next(iter(dataset), None)
        names = list(first) if first is not None else []
    missing = [column for column in (image_column, mask_column) if column not in names]
    if missing:
        options = "--image-column and --mask-column" if cli else "image_column=... and mask_column=..."
        raise ValueError(
            f"column(s) {', '.join(map(repr, missing))} not in the dataset; its columns are {names}. Pass "
            f"{options} naming the image and mask columns."
        )


def _select_split(dataset: Any, split: str, cli: bool = False) -> Any:
    import datasets

    if isinstance(dataset, (datasets.DatasetDict, datasets.IterableDatasetDict)):
        if split not in dataset:
            given = f"--split {split}" if cli else f"split={split!r}"
            raise ValueError(f"{given} not in the dataset; its splits are {list(dataset)}.")
        return dataset[split]
    return dataset


def _looks_local(source: str | os.PathLike) -> bool:
    """Whether `source` can only be a local path, so that a missing folder is reported as such instead of being
    looked up on the Hub: a Hub id is `name` or `namespace/name`, so a path object, a path starting with `.`, `/`
    or `~`, with two slashes or more, a backslash or a trailing slash is local, and so is `a/b` when `a` exists
    here (`my_data/train` next to `my_data/`)."""
    text = os.fspath(source)
    return (
        isinstance(source, os.PathLike)
        or text.startswith((".", "/", "~"))
        or text.count("/") > 1
        or "\\" in text
        or text.endswith("/")
        or ("/" in text and Path(text.split("/")[0]).exists())
    )


def _neither_here_nor_on_the_hub(source: str, reason: str) -> FileNotFoundError:
    return FileNotFoundError(
        f"{source!r} is neither a local folder (there is no {str(Path(source).absolute())!r}) nor a dataset on the "
        f"Hub ({reason}). Check the path (a folder with images/ + masks/ or im/ + gt/, or a save_to_disk "
        "directory), or the Hub dataset id."
    )


def _check_hub_reachable(source: str) -> None:
    """Fail fast when a Hub-id-shaped `source` that is no local path cannot be looked up on the Hub: one request
    without retries, where `datasets.load_dataset` would retry for about half a minute before giving up."""
    import huggingface_hub
    from huggingface_hub.errors import HfHubHTTPError

    if huggingface_hub.is_offline_mode():
        return  # datasets looks in its cache only, and says so at once
    try:
        huggingface_hub.HfApi().dataset_info(source, timeout=10)
    except HfHubHTTPError:
        return  # the Hub answered (not found, private, gated...): datasets gives the precise error at once
    except Exception as error:  # noqa: BLE001 - no answer at all: DNS, refused connection, timeout, proxy
        reason = " ".join(str(error).split()) or type(error).__name__
        raise _neither_here_nor_on_the_hub(
            source, f"the Hub could not be reached to look for it: {type(error).__name__}: {reason}"
        ) from error


def _open_dataset(source: str | os.PathLike, split: str, streaming: bool, cli: bool = False) -> Any:
    import datasets

    path = Path(source).expanduser()
    if not path.exists() and _looks_local(source):
        raise FileNotFoundError(
            f"data folder {os.fspath(source)!r} does not exist; check the path (a folder with images/ + masks/ or "
            "im/ + gt/, a save_to_disk directory, or a Hub dataset id such as 'user/name')."
        )
    if not path.exists():
        _check_hub_reachable(str(source))
    if path.is_dir() and any((path / name).is_file() for name in ("dataset_info.json", "dataset_dict.json", "state.json")):
        dataset = _select_split(datasets.load_from_disk(str(path)), split, cli)
        return dataset.to_iterable_dataset() if streaming and isinstance(dataset, datasets.Dataset) else dataset
    try:
        return datasets.load_dataset(str(source), split=split, streaming=streaming)
    except FileNotFoundError as error:
        if not path.exists():
            raise _neither_here_nor_on_the_hub(str(source), " ".join(str(error).split())) from error
        raise FileNotFoundError(
            f"{str(source)!r} is neither a folder of images and masks nor a dataset datasets.load_dataset can "
            f"find ({error}); pass an existing folder, a save_to_disk directory or a Hub dataset id."
        ) from error
    except ConnectionError as error:  # offline mode, or the Hub went away after the check above
        raise _neither_here_nor_on_the_hub(str(source), " ".join(str(error).split())) from error
    except ValueError as error:
        if "split" in str(error).lower() or "Unknown split" in str(error):
            given = f"--split {split}" if cli else f"split={split!r}"
            raise ValueError(f"{given} is not a split of {str(source)!r} ({error}).") from error
        raise


# ---------------------------------------------------------------------------------------------------------- entry


def load_records(
    source: Any,
    *,
    split: str = "train",
    image_column: str = "image",
    mask_column: str = "mask",
    layout: Layout = "auto",
    void_value: int | None = 255,
    instance_mode: InstanceMode = "binary",
    mask_format: MaskFormat = "auto",
    resize_masks: bool = False,
    streaming: bool = False,
) -> RecordSequence | IterableRecords:
    """Records of a data source, decoded lazily.

    Args:
        source: A `datasets.Dataset`, `IterableDataset`, `DatasetDict` or `IterableDatasetDict`; a folder of
            images and masks; a `save_to_disk` directory; or anything `datasets.load_dataset` accepts (local
            directory, Hub id).
        split: Split of a dataset dict / `load_dataset` source (ignored for folders and single datasets).
        image_column: Column of `datasets` sources holding the image.
        mask_column: Column of `datasets` sources holding the mask.
        layout: Folder layout: `"auto"`, `"images-masks"`, `"im-gt"` or `(image_folder, mask_folder)`.
        void_value: Label-map value to ignore (`None`: there is none); masks are decoded by [`decode_mask`].
        instance_mode: `"binary"` (all objects one mask) or `"split"` (one mask per object value).
        mask_format: `"auto"`, `"labels"`, `"threshold"` or `"trimap"`.
        resize_masks: Resize masks whose size differs from their image's.
        streaming: Stream `load_dataset` / `save_to_disk` sources instead of loading them (datasets larger than
            memory); the result is then an [`IterableRecords`].

    Returns:
        A [`RecordSequence`] (random access) or, for streamed sources, an [`IterableRecords`].
    """
    options = DecodeOptions(mask_format, void_value, instance_mode, resize_masks)
    return _load_records(source, options, split, image_column, mask_column, layout, streaming)


def _load_records(
    source: Any,
    options: DecodeOptions,
    split: str,
    image_column: str,
    mask_column: str,
    layout: Layout,
    streaming: bool,
) -> RecordSequence | IterableRecords:
    import datasets

    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if path.is_dir() and _looks_like_folder_layout(path, layout):
            return FolderRecords(find_folder_pairs(path, layout), options, path)
        if isinstance(layout, tuple) or layout != "auto":
            find_folder_pairs(path, layout)  # raises the folder error the user asked for
        source = _open_dataset(source, split, streaming, options.cli)
    source = _select_split(source, split, options.cli)
    if isinstance(source, datasets.Dataset):
        _check_columns(source, image_column, mask_column, options.cli)
        if streaming:
            return IterableRecords(source.to_iterable_dataset(), image_column, mask_column, options, split)
        return DatasetRecords(source, image_column, mask_column, options, split)
    if isinstance(source, datasets.IterableDataset):
        _check_columns(source, image_column, mask_column, options.cli)
        return IterableRecords(source, image_column, mask_column, options, split)
    raise TypeError(
        f"source is a {type(source).__name__}; pass a folder path, a datasets.Dataset / IterableDataset (or a dict "
        "of splits), a save_to_disk directory or a Hub dataset id."
    )


def load_record_sequence(source: Any, **kwargs: Any) -> RecordSequence:
    """[`load_records`] for sources that must support random access (map-style training datasets)."""
    if kwargs.get("streaming"):
        raise ValueError("load_record_sequence needs random access; use load_records(..., streaming=True) instead.")
    records = load_records(source, **kwargs)
    if not isinstance(records, RecordSequence):
        raise TypeError(
            "this source is streamed (an IterableDataset) and has no random access; use PASamIterableTrainingDataset "
            "or load it without streaming."
        )
    return records


def load_records_from_flags(flags: Any, data: str, split: str = "train", streaming: bool = False):
    """[`load_records`] with the decoding settings the `pasam` commands share: `flags` is an argparse namespace or
    [`TrainingArguments`] with `image_column`, `mask_column`, `void_value` (a negative value: no void label),
    `instance_mode` and `resize_masks`. Error messages and bad-sample reasons name the command-line flags."""
    void_value = flags.void_value
    options = DecodeOptions(
        void_value=None if void_value is not None and void_value < 0 else void_value,
        instance_mode=flags.instance_mode,
        resize_masks=getattr(flags, "resize_masks", False),
        cli=True,
    )
    return _load_records(data, options, split, flags.image_column, flags.mask_column, "auto", streaming)


def as_record_sequence(records: Sequence[SegmentationRecord] | RecordSequence) -> RecordSequence:
    """Wrap a plain list of records so that it has `sample_name`."""
    return records if isinstance(records, RecordSequence) else _ListRecords(list(records))


class _ListRecords(RecordSequence):
    def __init__(self, records: list[SegmentationRecord]):
        self.records = records

    def __len__(self) -> int:
        return len(self.records)

    def sample_name(self, index: int) -> str:
        return self.records[index].name

    def __getitem__(self, index: int) -> SegmentationRecord:  # type: ignore[override]
        return self.records[index]


__all__ = [
    "LAYOUT_PRESETS",
    "BadSampleError",
    "DatasetRecords",
    "DecodeOptions",
    "FolderRecords",
    "IterableRecords",
    "RecordSequence",
    "as_record_sequence",
    "find_folder_pairs",
    "load_record_sequence",
    "load_records",
    "load_records_from_flags",
]
