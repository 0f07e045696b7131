"""Training data: sources (folders, datasets, streaming), mask decoding (binary, palette with void, instance maps,
messy masks), bad-sample accounting, large-scale jitter, prompt simulation and batching."""

from __future__ import annotations

import warnings
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import synthetic_image, tiny_config
from PIL import Image

from pasam_hf import PASamProcessor
from pasam_hf.data import (
    PRESETS,
    BadSampleError,
    BadSampleTracker,
    DataQualityError,
    DatasetRecords,
    FolderRecords,
    IterableRecords,
    LargeScaleJitter,
    MaskDecodeError,
    PASamDataCollator,
    PASamIterableTrainingDataset,
    PASamTrainingDataset,
    PromptSimulator,
    SamplePreparer,
    SegmentationRecord,
    decode_mask,
    detect_mask_format,
    find_folder_pairs,
    is_bad_sample,
    load_record_sequence,
    load_records,
)

SIZE = 128  # tiny_config()'s input side


@pytest.fixture(scope="module")
def tiny_processor() -> PASamProcessor:
    return PASamProcessor.from_model_config(tiny_config())


def disc_mask(height: int = 40, width: int = 60, value: int = 255) -> np.ndarray:
    yy, xx = np.mgrid[:height, :width]
    return np.where((yy - height / 2) ** 2 + (xx - width / 2) ** 2 < (min(height, width) / 4) ** 2, value, 0).astype(
        np.uint8
    )


def write_pair(folder: Path, image_dir: str, mask_dir: str, stem: str, mask: np.ndarray, ext: str = ".png") -> None:
    (folder / image_dir).mkdir(parents=True, exist_ok=True)
    (folder / mask_dir).mkdir(parents=True, exist_ok=True)
    image = synthetic_image(*mask.shape[:2], seed=len(stem))
    Image.fromarray(image).save(folder / image_dir / f"{stem}{ext}")
    Image.fromarray(mask).save(folder / mask_dir / f"{stem}.png")


def palette_png(labels: np.ndarray, path: Path) -> None:
    image = Image.fromarray(labels.astype(np.uint8), mode="P")
    palette = [0, 0, 0, 128, 0, 0, 0, 128, 0, 128, 128, 0] + [0, 0, 0] * 251 + [224, 224, 192]
    image.putpalette(palette)
    image.save(path)


# --------------------------------------------------------------------------------------------------- sources


def test_images_masks_folder_matched_by_stem(tmp_path: Path) -> None:
    for stem in ("a", "b"):
        write_pair(tmp_path, "images", "masks", stem, disc_mask(), ext=".jpg" if stem == "a" else ".png")
    Image.fromarray(synthetic_image(20, 20)).save(tmp_path / "images" / "lonely.png")
    Image.fromarray(disc_mask()).save(tmp_path / "masks" / "orphan.png")
    with pytest.warns(UserWarning, match=r"2 files .* no partner.*images/lonely.png.*masks/orphan.png"):
        records = load_records(tmp_path)
    assert isinstance(records, FolderRecords) and len(records) == 2
    assert [records.sample_name(i) for i in range(2)] == ["a", "b"]
    record = records[0]
    assert record.image.size == (60, 40) and record.instances.shape == (1, 40, 60)
    assert set(np.unique(record.instances)) == {0, 1}
    assert np.array_equal(record.instances[0], disc_mask() // 255)


def test_hqseg_im_gt_preset_with_subsets(tmp_path: Path) -> None:
    write_pair(tmp_path / "DIS-VD", "im", "gt", "1", disc_mask())
    write_pair(tmp_path / "DIS-VD", "im", "gt", "2", disc_mask())
    write_pair(tmp_path / "COIFT", "im", "gt", "x", disc_mask())
    pairs = find_folder_pairs(tmp_path, layout="im-gt")
    expected = [("x.png", "COIFT"), ("1.png", "DIS-VD"), ("2.png", "DIS-VD")]
    assert [(image.name, subset) for image, _, subset in pairs] == expected
    records = load_records(tmp_path)
    assert records.subsets == ["COIFT", "DIS-VD"]
    assert records[1].subset == "DIS-VD" and records[1].name == "DIS-VD/1"
    # A custom pair of folder names.
    write_pair(tmp_path / "custom", "rgb", "labels", "c", disc_mask())
    assert len(load_records(tmp_path / "custom", layout=("rgb", "labels"))) == 1


def test_missing_folder_with_one_slash_is_local_or_fails_fast_naming_both(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`my_data/train` beside an existing `my_data/` is a local path: reported at once, never looked up on the Hub.
    `someone/missing` (nothing local) is a Hub id, but an unreachable Hub is found with one request, not
    datasets' half-minute of retries, and the error names both readings."""
    import socket
    import time

    import huggingface_hub.constants

    monkeypatch.chdir(tmp_path)
    (tmp_path / "my_data").mkdir()
    # Online, with a Hub that refuses connections (a port nobody listens on): what datasets would retry.
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        endpoint = f"http://127.0.0.1:{probe.getsockname()[1]}"
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", endpoint)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(datasets.config, "HF_ENDPOINT", endpoint)
    started = time.perf_counter()
    with pytest.raises(FileNotFoundError, match=r"data folder 'my_data/train' does not exist; check the path"):
        load_records("my_data/train")
    with pytest.raises(FileNotFoundError) as raised:
        load_records("someone/missing")
    assert time.perf_counter() - started < 5
    message = str(raised.value)
    assert "'someone/missing' is neither a local folder" in message and str(tmp_path / "someone") in message
    assert "the Hub could not be reached" in message
    # Offline: datasets looks in its cache only; the error still names both readings.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    with pytest.raises(FileNotFoundError, match="'someone/missing' is neither a local folder .* nor a dataset on the Hub"):
        load_records("someone/missing")


def test_folder_errors_name_the_problem(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_records(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_records(str(tmp_path / "missing" / "train"))  # a local path: never looked up on the Hub
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    Image.fromarray(synthetic_image(10, 10)).save(tmp_path / "images" / "a.png")
    Image.fromarray(disc_mask()).save(tmp_path / "masks" / "b.png")
    with pytest.raises(FileNotFoundError, match="no mask has the file stem of an image"):
        find_folder_pairs(tmp_path)
    with pytest.raises(FileNotFoundError, match="expected im/ \\+ gt/"):
        find_folder_pairs(tmp_path, layout="im-gt")
    with pytest.raises(ValueError, match="layout='nope'"):
        find_folder_pairs(tmp_path, layout="nope")


def _dataset(image_column: str = "image", mask_column: str = "mask", count: int = 3) -> datasets.Dataset:
    images = [Image.fromarray(synthetic_image(40, 60, seed=i)) for i in range(count)]
    masks = [Image.fromarray(disc_mask()) for _ in range(count)]
    return datasets.Dataset.from_dict({image_column: images, mask_column: masks})


def test_datasets_source_with_configurable_columns() -> None:
    dataset = _dataset("pixels", "segmentation")
    records = load_records(dataset, image_column="pixels", mask_column="segmentation")
    assert isinstance(records, DatasetRecords) and len(records) == 3
    assert records[2].name == "train[2]" and records[2].instances.shape == (1, 40, 60)
    with pytest.raises(ValueError, match=r"'mask'.*not in the dataset.*image_column=\.\.\. and mask_column"):
        load_records(dataset, image_column="pixels")
    splits = datasets.DatasetDict(train=dataset, validation=_dataset("pixels", "segmentation", 1))
    assert len(load_records(splits, split="validation", image_column="pixels", mask_column="segmentation")) == 1
    with pytest.raises(ValueError, match="split='test' not in the dataset"):
        load_records(splits, split="test", image_column="pixels", mask_column="segmentation")


def test_datasets_array_columns() -> None:
    """`Dataset.from_dict` with numpy arrays stores lists; they decode like the arrays they were."""
    mask = np.zeros((20, 30), np.uint8)
    mask[5:10, 5:12] = 1
    mask[12:18, 15:25] = 2
    dataset = datasets.Dataset.from_dict({"image": [synthetic_image(20, 30)], "mask": [mask]})
    record = load_records(dataset, instance_mode="split")[0]
    assert record.image.size == (30, 20)
    assert np.array_equal(np.asarray(record.image), synthetic_image(20, 30))
    assert record.instances.shape == (2, 20, 30)
    assert np.array_equal(record.instances[0], (mask == 1).astype(np.uint8))
    assert np.array_equal(record.instances[1], (mask == 2).astype(np.uint8))


def test_streaming_sources(tmp_path: Path) -> None:
    dataset = _dataset()
    stream = load_records(dataset.to_iterable_dataset())
    assert isinstance(stream, IterableRecords)
    assert [record.name for record in stream] == ["train[0]", "train[1]", "train[2]"]
    assert isinstance(load_records(dataset, streaming=True), IterableRecords)
    dataset.save_to_disk(str(tmp_path / "saved"))
    streamed = load_records(tmp_path / "saved", streaming=True)
    assert isinstance(streamed, IterableRecords) and len(list(streamed)) == 3
    assert len(load_records(tmp_path / "saved")) == 3
    with pytest.raises(TypeError, match="no random access"):
        load_record_sequence(dataset.to_iterable_dataset())
    # Each DataLoader worker decodes only its own rows.
    assert [s.name for s in stream.iter_samples(1, 2)] == ["train[1]"]


def test_iterable_training_dataset_yields_items_and_bad_markers(tiny_processor: PASamProcessor) -> None:
    images = [Image.fromarray(synthetic_image(40, 60, seed=i)) for i in range(3)]
    masks = [Image.fromarray(disc_mask()), Image.fromarray(np.zeros((40, 60), np.uint8)), Image.fromarray(disc_mask())]
    stream = load_records(datasets.Dataset.from_dict({"image": images, "mask": masks}).to_iterable_dataset())
    items = list(PASamIterableTrainingDataset(stream, tiny_processor, seed=0))
    assert len(items) == 3 and is_bad_sample(items[1]) and items[1]["bad_kind"] == "empty"
    assert items[0]["pixel_values"].shape == (3, SIZE, SIZE) and items[2]["labels"].shape[-2:] == (SIZE, SIZE)


# ----------------------------------------------------------------------------------------------------- masks


def test_mask_encodings() -> None:
    binary01 = disc_mask(value=1)
    binary255 = disc_mask(value=255)
    expected = (binary255 > 0).astype(np.uint8)[None]
    assert detect_mask_format(binary01) == "labels" and detect_mask_format(binary255) == "threshold"
    assert np.array_equal(decode_mask(binary01), expected)
    assert np.array_equal(decode_mask(binary255), expected)
    assert np.array_equal(decode_mask(binary255.astype(bool)), expected)
    assert np.array_equal(decode_mask(binary255 / 255.0), expected)  # floats in [0, 1]: > 0.5
    assert np.array_equal(decode_mask(torch.from_numpy(binary255)[None]), expected)  # (1, H, W) tensor
    # Trimap (the hq-fixture convention): 128 is ignored.
    trimap = binary255.copy()
    trimap[:, :5] = 128
    decoded = decode_mask(trimap)
    assert decoded.shape == (1, 40, 60) and (decoded[0, :, :5] == 255).all() and (decoded[0, :, 5:] < 2).all()
    # JPEG-like grey levels: foreground is > 128 (the HQSeg protocol).
    grey = np.array([[0, 3, 120, 129, 200, 254]], np.uint8)
    assert detect_mask_format(grey) == "threshold"
    assert decode_mask(grey)[0].tolist() == [[0, 0, 0, 1, 1, 1]]
    with pytest.raises(ValueError, match="mask_format='rle'"):
        decode_mask(grey, mask_format="rle")


def test_palette_mask_with_void_and_instance_split(tmp_path: Path) -> None:
    labels = np.zeros((30, 40), np.uint8)
    labels[2:10, 2:10] = 1
    labels[15:25, 20:35] = 3
    labels[10:12, :] = 255  # void border
    palette_png(labels, tmp_path / "m.png")
    binary = decode_mask(tmp_path / "m.png")
    assert binary.shape == (1, 30, 40)
    assert (binary[0][labels == 255] == 255).all()
    assert np.array_equal(binary[0] == 1, (labels == 1) | (labels == 3))
    split = decode_mask(tmp_path / "m.png", instance_mode="split")
    assert split.shape == (2, 30, 40)
    for instance, value in zip(split, (1, 3)):
        assert np.array_equal(instance == 1, labels == value)
        assert np.array_equal(instance == 255, labels == 255)  # void stays void in every instance
        assert ((instance == 0) == ((labels != value) & (labels != 255))).all()
    # Without a void value, 255 is one more object.
    assert decode_mask(tmp_path / "m.png", instance_mode="split", void_value=None).shape == (3, 30, 40)


def test_colour_and_16_bit_instance_maps() -> None:
    colour = np.zeros((20, 20, 3), np.uint8)
    colour[2:8, 2:8] = (0, 0, 255)  # pure blue: not the void value 255
    colour[10:18, 10:18] = (200, 30, 30)
    split = decode_mask(colour, instance_mode="split")
    assert split.shape == (2, 20, 20) and set(np.unique(split)) == {0, 1}
    assert sorted(int(m.sum()) for m in split) == [36, 64]
    ids = np.zeros((20, 20), np.uint16)
    ids[:5, :5], ids[10:, 10:], ids[5:8, 0:3] = 7, 300, 1000
    assert detect_mask_format(ids) == "labels"
    assert decode_mask(ids, instance_mode="split").shape == (3, 20, 20)
    # Nearest-neighbour resizing keeps colour labels intact.
    resized = decode_mask(colour, image_size=(40, 40), resize_masks=True, instance_mode="split")
    assert resized.shape == (2, 40, 40) and sorted(int(m.sum()) for m in resized) == [144, 256]


def test_messy_masks() -> None:
    empty = np.zeros((10, 12), np.uint8)
    assert decode_mask(empty).shape == (0, 10, 12)
    full = np.full((10, 12), 255, np.uint8)
    assert (decode_mask(full) == 1).all()
    only_void = np.full((10, 12), 255, np.uint8)
    assert decode_mask(Image.fromarray(only_void, mode="L").convert("P")).shape == (0, 10, 12)
    mismatched = disc_mask(20, 30)
    with pytest.raises(MaskDecodeError, match=r"30x20 \(WxH\) but its image is 60x40.*resize_masks=True"):
        decode_mask(mismatched, image_size=(60, 40))
    resized = decode_mask(mismatched, image_size=(60, 40), resize_masks=True)
    assert resized.shape == (1, 40, 60) and set(np.unique(resized)) == {0, 1}  # nearest: no blended labels
    assert np.array_equal(resized[0, ::2, ::2], mismatched // 255)
    with pytest.raises(MaskDecodeError, match="NaN"):
        decode_mask(np.full((4, 4), np.nan))
    with pytest.raises(MaskDecodeError, match="2-D map"):
        decode_mask(np.zeros((2, 4, 4, 2), np.uint8))
    with pytest.raises(MaskDecodeError, match="is a str|not a file"):
        decode_mask("no/such/mask.png")


def test_corrupt_files_are_named_bad_samples(tmp_path: Path, tiny_processor: PASamProcessor) -> None:
    for stem in ("good", "badimage", "badmask", "empty", "small"):
        write_pair(tmp_path, "images", "masks", stem, disc_mask())
    (tmp_path / "images" / "badimage.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    (tmp_path / "masks" / "badmask.png").write_bytes(b"not an image at all")
    Image.fromarray(np.zeros((40, 60), np.uint8)).save(tmp_path / "masks" / "empty.png")
    Image.fromarray(disc_mask(20, 30)).save(tmp_path / "masks" / "small.png")  # another size than its image
    records = load_records(tmp_path)
    names = [records.sample_name(i) for i in range(len(records))]
    errors = {}
    for index, name in enumerate(names):
        try:
            records[index]
        except BadSampleError as error:
            errors[name] = error
    assert set(errors) == {"badimage", "badmask", "small"}
    assert errors["badimage"].kind == "image" and "badimage.png" in str(errors["badimage"])
    assert errors["badmask"].kind == "mask" and "badmask.png" in str(errors["badmask"])
    assert "resize_masks=True" in errors["small"].reason
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        decoded = list(records)  # iteration skips (and warns about) the bad ones; "empty" decodes, with K = 0
    assert [record.name for record in decoded] == ["empty", "good"] and decoded[0].num_instances == 0
    assert sorted(str(w.message).split(":")[0] for w in caught) == [
        "skipping bad sample badimage",
        "skipping bad sample badmask",
        "skipping bad sample small",
    ]

    dataset = PASamTrainingDataset(records, tiny_processor, seed=0)
    items = [dataset[i] for i in range(len(dataset))]
    assert [is_bad_sample(item) for item in items] == [True, True, True, False, True]  # sorted: badimage, badmask, ...
    collator = PASamDataCollator(PromptSimulator(seed=0))
    batch = collator(items)
    assert batch["names"] == ["good"]
    assert sorted(batch["skipped"]) == ["badimage", "badmask", "empty", "small"]
    kinds = {detail["name"]: detail["kind"] for detail in batch["skipped_details"]}
    assert kinds == {"badimage": "image", "badmask": "mask", "empty": "empty", "small": "mask"}
    assert collator([items[0], items[1]]).keys() == {"skipped", "skipped_details"}

    tracker = BadSampleTracker(max_fraction=0.5, min_samples=4)
    with pytest.raises(DataQualityError, match=r"4 of 5 training samples \(80.0%\).*badimage \(.*badimage.png"):
        tracker.update(batch)
    # Below min_samples only the complete epoch decides.
    small = BadSampleTracker(max_fraction=0.1, min_samples=20)
    small.update(batch)
    assert small.exceeds(complete=True) and not small.exceeds()
    assert small.summary()["by_kind"] == {"image": 1, "mask": 2, "empty": 1}


# ------------------------------------------------------------------------------------------------ real data


def test_davis345_palette_masks(shared_data: Path) -> None:
    root = shared_data / "davis345"
    if not root.is_dir():
        pytest.skip("davis345 not found")
    records = load_records(root, instance_mode="split")
    assert len(records) == 345
    by_name = {records.sample_name(i): i for i in range(len(records))}
    # 195: objects 1 and 2 and 160 void pixels; 200: four objects; 008: a single object labelled 2.
    record = records[by_name["195"]]
    raw = np.asarray(Image.open(root / "masks" / "195.png"))
    assert record.instances.shape == (2, 480, 854)
    assert [int((m == 1).sum()) for m in record.instances] == [17919, 1250]
    assert all(int((m == 255).sum()) == 160 for m in record.instances)
    assert np.array_equal(record.instances[0] == 255, raw == 255)
    assert records[by_name["200"]].instances.shape == (4, 480, 854)
    assert records[by_name["008"]].instances.shape == (1, 480, 854)
    binary = load_records(root)[by_name["195"]]
    assert binary.instances.shape == (1, 480, 854) and int((binary.instances == 1).sum()) == 17919 + 1250


def test_hq_fixture_trimaps(hq_fixture: list[dict]) -> None:
    root = Path(hq_fixture[0]["image"]).parents[1]
    records = load_records(root)
    assert len(records) == 8
    index_of = {records.sample_name(index): index for index in range(len(records))}
    for item in hq_fixture:
        record = records[index_of[Path(item["image"]).stem]]
        raw = np.asarray(Image.open(item["mask"]))
        assert record.image.size == (item["width"], item["height"])
        assert np.array_equal(record.instances[0] == 1, raw == 255)
        assert np.array_equal(record.instances[0] == 255, raw == 128)


# ---------------------------------------------------------------------------------------------- augmentation


def _coded_sample(height: int = 60, width: int = 90) -> tuple[np.ndarray, np.ndarray]:
    """An image whose red channel is 250 on the mask and 10 elsewhere."""
    mask = np.zeros((1, height, width), np.uint8)
    mask[0, 10:45, 20:50] = 1
    mask[0, 5:15, 70:85] = 1
    image = np.full((height, width, 3), 60, np.uint8)
    image[..., 0] = np.where(mask[0] == 1, 250, 10)
    return image, mask


def test_large_scale_jitter_geometry_and_padding() -> None:
    image, mask = _coded_sample()
    jitter = LargeScaleJitter(size=SIZE)
    assert (jitter.image_pad_value, jitter.mask_pad_value, jitter.scale_range) == (128, 0, (0.1, 2.0))
    longest_sides = []
    for seed in range(200):
        out_image, out_masks = jitter(image, mask, np.random.default_rng(seed))
        assert out_image.shape == (SIZE, SIZE, 3) and out_masks.shape == (1, SIZE, SIZE)
        # Masks are resized bilinearly by default, as the release: float32 soft labels (reference section 6).
        assert out_image.dtype == np.uint8 and out_masks.dtype == np.float32
        # Content is the top-left rectangle; padding is 128 (image, all channels) and 0 (masks).
        content = ~(out_image == 128).all(axis=-1)
        rows, cols = np.flatnonzero(content.any(1)), np.flatnonzero(content.any(0))
        height, width = rows[-1] + 1, cols[-1] + 1
        assert (out_image[height:] == 128).all() and (out_image[:, width:] == 128).all()
        assert (out_masks[:, height:] == 0).all() and (out_masks[:, :, width:] == 0).all()
        if height < SIZE and width < SIZE:
            # Not cropped: the aspect ratio 90:60 is kept, longest side = scale x S.
            assert abs(width / height - 1.5) < 0.2 or min(height, width) < 8
            longest_sides.append(width)
    scales = np.array(longest_sides) / SIZE
    assert scales.min() >= 0.1 - 1 / SIZE and scales.max() < 1.0
    assert scales.min() < 0.2 and scales.max() > 0.8  # the low end of U(0.1, 2.0) is reached


def test_jitter_keeps_image_and_mask_aligned() -> None:
    image, mask = _coded_sample()
    jitter = LargeScaleJitter(size=SIZE)
    checked = 0
    for seed in range(40):
        out_image, out_masks = jitter(image, mask, np.random.default_rng(seed))
        foreground = out_masks[0] > 0.5
        red = out_image[..., 0] > 128
        content = ~(out_image == 128).all(-1)
        if foreground.sum() > 200:
            # Image and soft mask, both bilinear, differ only along the edges; a shift or a flip would not match.
            iou = (red & foreground & content).sum() / ((red & content) | foreground).sum()
            assert iou > 0.85, (seed, iou)
            checked += 1
    assert checked > 10
    flipped, _ = LargeScaleJitter(size=SIZE, flip_probability=1.0, scale_range=(1.0, 1.0))(
        image, mask, np.random.default_rng(0)
    )
    plain, _ = LargeScaleJitter(size=SIZE, flip_probability=0.0, scale_range=(1.0, 1.0))(
        image, mask, np.random.default_rng(0)
    )
    content_width = round(90 * SIZE / 90)
    assert np.array_equal(flipped[:, :content_width], plain[:, :content_width][:, ::-1])


def test_augmentation_is_deterministic_given_the_seed(tiny_processor: PASamProcessor) -> None:
    image, mask = _coded_sample()
    jitter = LargeScaleJitter(size=SIZE)
    a = jitter(image, mask, np.random.default_rng(3))
    b = jitter(image, mask, np.random.default_rng(3))
    c = jitter(image, mask, np.random.default_rng(4))
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    assert not np.array_equal(a[0], c[0])
    records = [SegmentationRecord("s", Image.fromarray(image), mask)]
    dataset = PASamTrainingDataset(records, tiny_processor, seed=1)
    first = dataset[0]["pixel_values"]
    assert torch.equal(first, PASamTrainingDataset(records, tiny_processor, seed=1)[0]["pixel_values"])
    dataset.set_epoch(1)
    assert not torch.equal(first, dataset[0]["pixel_values"])


def test_evaluation_geometry_is_sams(tiny_processor: PASamProcessor) -> None:
    image, mask = _coded_sample(60, 90)
    record = SegmentationRecord("s", Image.fromarray(image), mask)
    preparer = SamplePreparer(tiny_processor, augment=False)
    item = preparer(record, np.random.default_rng(0))
    again = preparer(record, np.random.default_rng(99))
    assert torch.equal(item["pixel_values"], again["pixel_values"]) and torch.equal(item["labels"], again["labels"])
    reference = tiny_processor(images=image, return_tensors="pt")
    height, width = reference["reshaped_input_sizes"][0].tolist()
    assert (height, width) == (85, 128)
    # As at inference: the normalised image is padded with 0, the labels with background.
    assert (item["pixel_values"][:, height:] == 0).all() and (item["labels"][:, height:] == 0).all()
    assert torch.allclose(item["pixel_values"], reference["pixel_values"][0], atol=0.1)
    labels = item["labels"][0]
    red = item["pixel_values"][0]
    assert (red[labels == 1] > 1.5).float().mean() > 0.9
    assert (red[:height][labels[:height] == 0] < 0).float().mean() > 0.9


# --------------------------------------------------------------------------------------------------- prompts


def _labels(batch: int = 2, prompts: int = 3, size: int = SIZE, seed: int = 0) -> torch.Tensor:
    """(B, P, S, S) labels: random rectangles of foreground, a void strip, background elsewhere."""
    rng = np.random.default_rng(seed)
    labels = torch.zeros(batch, prompts, size, size, dtype=torch.uint8)
    for b in range(batch):
        for p in range(prompts):
            y0, x0 = rng.integers(0, size // 2, 2)
            h, w = rng.integers(size // 8, size // 2, 2)
            labels[b, p, y0 : y0 + h, x0 : x0 + w] = 1
            labels[b, p, y0 + h : y0 + h + 2, x0 : x0 + w] = 255
    return labels


def test_tight_and_noisy_boxes() -> None:
    labels = _labels()
    boxes = PromptSimulator(seed=0)(labels, kind="boxes")["input_boxes"]
    assert boxes.shape == (2, 3, 4) and boxes.dtype == torch.float32
    for b in range(2):
        for p in range(3):
            ys, xs = np.nonzero(labels[b, p].numpy() == 1)
            assert boxes[b, p].tolist() == [xs.min(), ys.min(), xs.max(), ys.max()]
    noisy_sim = PromptSimulator(box_noise=True, box_noise_max=5, seed=0)
    noisy = noisy_sim(labels, kind="boxes")["input_boxes"]
    assert not torch.equal(noisy, boxes)
    assert (noisy >= 0).all() and (noisy <= SIZE - 1).all()
    assert (noisy[..., 0] <= noisy[..., 2]).all() and (noisy[..., 1] <= noisy[..., 3]).all()
    assert ((noisy - boxes).abs() <= 5 + 1e-4).all()


def test_points_inside_foreground_negatives_outside() -> None:
    labels = _labels()
    assert PromptSimulator().num_points == 10  # the release's 10 foreground points
    simulator = PromptSimulator(num_points=10, num_negative_points=3, seed=0)
    prompts = simulator(labels, kind="points")
    points, point_labels = prompts["input_points"], prompts["input_labels"]
    assert points.shape == (2, 3, 13, 2) and point_labels.shape == (2, 3, 13) and point_labels.dtype == torch.int64
    assert (point_labels[..., :10] == 1).all() and (point_labels[..., 10:] == 0).all()
    x, y = points[..., 0].long(), points[..., 1].long()
    values = labels[torch.arange(2)[:, None, None], torch.arange(3)[None, :, None], y, x]
    assert (values[..., :10] == 1).all()
    assert (values[..., 10:] == 0).all()  # background, never void
    # The 10 foreground points are distinct pixels when the object is large enough.
    flat = (y * SIZE + x)[..., :10]
    assert all(len(set(row.tolist())) == 10 for row in flat.reshape(-1, 10))
    # No background at all: negatives become padding points.
    full = torch.ones(1, 1, SIZE, SIZE, dtype=torch.uint8)
    padded = simulator(full, kind="points")
    assert (padded["input_labels"][0, 0, 10:] == -10).all() and (padded["input_points"][0, 0, 10:] == -10).all()


def test_noisy_masks_follow_the_incoherent_band_recipe() -> None:
    size = 1024
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    disc = ((yy - 500) ** 2 + (xx - 520) ** 2 < 300**2).to(torch.uint8)
    labels = disc[None, None].repeat(1, 2, 1, 1)
    simulator = PromptSimulator(seed=0)
    prompts = simulator(labels, kind="masks")["input_masks"]
    assert prompts.shape == (1, 2, 256, 256) and prompts.dtype == torch.float32
    # The release feeds SAM's mask encoder 0 / 255 (reference section 6).
    assert set(prompts.unique().tolist()) == {0.0, 255.0}
    target = F.interpolate(disc[None, None].float(), size=(256, 256), mode="bilinear", align_corners=False)[0, 0]
    small = F.interpolate(target[None, None], size=32, mode="bilinear")
    blurred = F.interpolate(small, size=256, mode="bilinear")[0, 0]
    band = (target - blurred).abs() >= 0.01
    noisy = prompts[0, 0]
    # Outside the band the prompt is the thresholded ground truth; the band hugs the boundary.
    assert torch.equal(noisy[~band], (target[~band] > 0.5).float() * 255)
    distance_to_boundary = ((yy[::4, ::4] - 500) ** 2 + (xx[::4, ::4] - 520) ** 2).float().sqrt().sub(300).abs() / 4
    assert distance_to_boundary[band].max() < 16
    # Unit Gaussian noise: pixels of the band at 0 or 1 flip with probability P(N(0,1) > 0.5) = 0.3085.
    hard = band & ((target == 0) | (target == 1))
    flipped = (noisy[hard] / 255 != target[hard]).float().mean().item()
    assert 0.27 < flipped < 0.35, flipped
    assert not torch.equal(prompts[0, 0], prompts[0, 1])  # independent noise per instance


@pytest.mark.parametrize("preset", ["pa-sam", "hq-sam"])
def test_prompt_kind_frequencies(preset: str) -> None:
    simulator = PromptSimulator(preset, seed=1234)
    draws = [simulator.sample_kind() for _ in range(7000)]
    for kind, probability in PRESETS[preset].items():
        assert abs(draws.count(kind) / len(draws) - probability) < 0.025, (kind, draws.count(kind))
    assert PRESETS["pa-sam"] == {"boxes": 4 / 7, "points": 2 / 7, "masks": 1 / 7}
    with pytest.raises(ValueError, match="preset='sam'"):
        PromptSimulator("sam")


def _item(name: str, instances: int, seed: int = 0) -> dict:
    labels = _labels(1, instances, seed=seed)[0]
    return {
        "pixel_values": torch.randn(3, SIZE, SIZE),
        "adapter_pixel_values": torch.randn(4, SIZE // 4, SIZE // 4),
        "labels": labels,
        "name": name,
    }


def test_collator_pads_instances_and_batches_prompts(monkeypatch: pytest.MonkeyPatch) -> None:
    simulator = PromptSimulator(num_points=4, seed=0)
    calls = []
    original = PromptSimulator.__call__

    def counting(self, labels, valid=None, kind=None):
        calls.append(tuple(labels.shape))
        return original(self, labels, valid, kind)

    monkeypatch.setattr(PromptSimulator, "__call__", counting)
    collator = PASamDataCollator(simulator, max_instances_per_image=3)
    items = [_item("one", 1), _item("five", 5, seed=1)]
    expected = {
        "boxes": {"input_boxes": ((2, 3, 4), torch.float32)},
        "points": {"input_points": ((2, 3, 4, 2), torch.float32), "input_labels": ((2, 3, 4), torch.int64)},
        "masks": {"input_masks": ((2, 3, SIZE // 4, SIZE // 4), torch.float32)},
    }
    seen_kinds = set()
    for _ in range(40):
        batch = collator(items)
        kind = next(k for k, keys in expected.items() if set(keys) <= set(batch))
        seen_kinds.add(kind)
        for key, (shape, dtype) in expected[kind].items():
            assert tuple(batch[key].shape) == shape and batch[key].dtype == dtype
        assert batch["pixel_values"].shape == (2, 3, SIZE, SIZE)
        assert batch["adapter_pixel_values"].shape == (2, 4, SIZE // 4, SIZE // 4)
        assert batch["labels"].shape == (2, 3, SIZE, SIZE) and batch["labels"].dtype == torch.uint8
        assert torch.equal(batch["labels"][0, 0], items[0]["labels"][0])
        assert (batch["labels"][0, 1:] == 255).all()  # padding slots: all ignored by the loss
        assert batch["names"] == ["one", "five"] and batch["skipped"] == []
        if kind == "boxes":
            assert batch["input_boxes"][0, 1:].tolist() == [[0, 0, SIZE - 1, SIZE - 1]] * 2  # dummy prompt
    assert seen_kinds == {"boxes", "points", "masks"}
    # Every instance of the batch gets its prompt in one vectorised call, never one call per instance or image.
    assert calls == [(2, 3, SIZE, SIZE)] * 40
    # The subset of 3 of the 5 instances keeps their order.
    kept = batch["labels"][1]
    originals = [items[1]["labels"][i] for i in range(5)]
    indices = [next(i for i, o in enumerate(originals) if torch.equal(o, k)) for k in kept]
    assert indices == sorted(indices) and len(set(indices)) == 3


def test_collator_rejects_mixed_items() -> None:
    collator = PASamDataCollator(PromptSimulator(seed=0))
    cached = _item("cached", 1)
    cached["image_embeddings"] = cached.pop("pixel_values")
    with pytest.raises(ValueError, match="exactly one of"):
        collator([_item("raw", 1), cached])
    with pytest.raises(ValueError, match="at least 1"):
        PASamDataCollator(PromptSimulator(seed=0), max_instances_per_image=0)
