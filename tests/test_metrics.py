"""Mask IoU and boundary IoU on hand-computed cases and against a re-implementation of Cheng et al.'s formula; the
per-subset accumulator (mean of means, CSV, JSON, table); the `pasam_segmentation` evaluate module."""

from __future__ import annotations

import configparser
import csv
import json
import math
from pathlib import Path

import cv2
import numpy as np
import PIL.Image
import pytest
import torch

from pasam_hf.metrics import EMPTY_UNION_IOU, SegmentationMetrics, boundary_iou, load_evaluate_metric, mask_iou

REPO_ROOT = Path(__file__).resolve().parents[1]
METRIC_DIR = REPO_ROOT / "src" / "pasam_hf" / "evaluate_metrics" / "pasam_segmentation"


def square(size: int, y0: int, y1: int, x0: int, x1: int, height: int | None = None) -> np.ndarray:
    mask = np.zeros((height or size, size), dtype=bool)
    mask[y0:y1, x0:x1] = True
    return mask


# ---------------------------------------------------------------------------------------------------- mask IoU
def test_mask_iou_of_overlapping_squares():
    gt = square(8, 2, 6, 2, 6)  # 16 pixels
    pred = square(8, 4, 8, 4, 8)  # 16 pixels, overlap rows 4-5 x cols 4-5 = 4
    assert mask_iou(pred, gt).item() == pytest.approx(4 / (16 + 16 - 4))


def test_mask_iou_empty_and_full_masks():
    empty = np.zeros((8, 8), dtype=bool)
    full = np.ones((8, 8), dtype=bool)
    gt = square(8, 2, 6, 2, 6)
    assert mask_iou(empty, empty).item() == EMPTY_UNION_IOU == 1.0
    assert mask_iou(empty, gt).item() == 0.0
    assert mask_iou(full, full).item() == 1.0
    assert mask_iou(full, gt).item() == pytest.approx(16 / 64)


def test_mask_iou_ignores_void_pixels():
    gt = square(8, 2, 6, 2, 6)
    pred = square(8, 2, 6, 2, 8)  # 8 extra pixels in columns 6-7
    assert mask_iou(pred, gt).item() == pytest.approx(16 / 24)
    ignore = square(8, 0, 8, 6, 8)  # columns 6-7 are void: the extra pixels do not count
    assert mask_iou(pred, gt, ignore=ignore).item() == 1.0
    # All pixels void: an empty union, which counts as agreement.
    assert mask_iou(pred, gt, ignore=np.ones((8, 8), dtype=bool)).item() == EMPTY_UNION_IOU


def test_mask_iou_shapes_and_input_types():
    gt = np.stack([square(8, 2, 6, 2, 6), square(8, 0, 8, 0, 8)])
    pred = torch.from_numpy(np.stack([square(8, 2, 6, 2, 6), square(8, 0, 4, 0, 8)]).astype(np.uint8))
    ious = mask_iou(pred, gt)
    assert ious.shape == (2,) and ious.dtype == torch.float64
    assert ious.tolist() == pytest.approx([1.0, 0.5])
    assert mask_iou(gt[0], gt[0]).shape == ()


def test_mask_iou_rejects_bad_inputs():
    gt = square(8, 2, 6, 2, 6)
    with pytest.raises(ValueError, match="binary"):
        mask_iou(gt.astype(np.uint8) * 255, gt)
    with pytest.raises(ValueError, match="same shape"):
        mask_iou(square(9, 2, 6, 2, 6), gt)
    with pytest.raises(ValueError, match="shape"):
        mask_iou(np.zeros(8, dtype=bool), np.zeros(8, dtype=bool))


# ------------------------------------------------------------------------------------------------ boundary IoU
def test_boundary_iou_square_against_half_square():
    # 8x8 image: d = max(1, round(0.02 * sqrt(128))) = max(1, 0) = 1.
    gt = square(8, 2, 6, 2, 6)  # band: the 16 pixels minus the 2x2 interior = 12
    pred = square(8, 2, 6, 2, 4)  # 4x2: erosion by 1 leaves nothing, band = all 8 pixels
    # Shared band pixels: pred's 8 pixels minus the 2 that are gt's interior (rows 3-4, column 3) = 6.
    assert boundary_iou(pred, gt).item() == pytest.approx(6 / (12 + 8 - 6))


def test_boundary_iou_ring_against_filled_square():
    # 20x20 image: d = round(0.02 * 28.28) = round(0.57) = 1.
    filled = square(20, 5, 15, 5, 15)  # band = outer 1-pixel ring of the 10x10 square = 100 - 64 = 36
    ring = filled & ~square(20, 7, 13, 7, 13)  # 2 pixels thick: every pixel touches background, band = 64
    # The ring's band contains the filled square's band: intersection 36, union 64.
    assert boundary_iou(ring, filled).item() == pytest.approx(36 / 64)
    assert mask_iou(ring, filled).item() == pytest.approx(64 / 100)


def test_boundary_iou_wider_band_of_shifted_squares():
    # 100x100 image: d = round(0.02 * 141.42) = round(2.83) = 3; a 60x60 square's band = 60^2 - 54^2 = 684.
    gt = square(100, 20, 80, 20, 80)
    pred = square(100, 20, 80, 30, 90)  # shifted 10 pixels right
    # Shared: top and bottom strips (3 rows each) over columns 30-79 (50 columns) = 2 * 150; the side strips
    # (columns 20-22, 77-79 vs 30-32, 87-89) do not meet.
    assert boundary_iou(pred, gt).item() == pytest.approx(300 / (684 + 684 - 300))


def test_boundary_iou_full_masks_touch_the_border():
    full = np.ones((8, 8), dtype=bool)  # the image border counts as background: band = the 28 border pixels
    inner = square(8, 1, 7, 1, 7)  # band = its own 20-pixel ring, one pixel inside the border
    assert boundary_iou(full, full).item() == 1.0
    assert boundary_iou(inner, full).item() == 0.0
    empty = np.zeros((8, 8), dtype=bool)
    assert boundary_iou(empty, empty).item() == EMPTY_UNION_IOU
    assert boundary_iou(empty, full).item() == 0.0


def test_boundary_iou_ignores_void_pixels_after_taking_the_bands():
    gt = square(8, 2, 6, 2, 6)
    pred = square(8, 2, 6, 2, 4)
    ignore = square(8, 0, 8, 4, 6)  # columns 4-5: removes 6 of gt's 12 band pixels, none of pred's
    # gt's remaining band: column 2 (4 pixels) + column 3 rows 2 and 5 (2) = 6, all inside pred's band of 8.
    assert boundary_iou(pred, gt, ignore=ignore).item() == pytest.approx(6 / 8)


def reference_boundary(mask: np.ndarray, dilation_ratio: float = 0.02) -> np.ndarray:
    """The inner boundary band of Cheng et al. (2021), written from the paper's definition: the mask minus its
    erosion by d = max(1, round(dilation_ratio x diagonal)) iterations of a 3x3 erosion, on the mask padded with
    one pixel of background so that the image border is boundary."""
    height, width = mask.shape
    d = max(1, round(dilation_ratio * math.hypot(height, width)))
    padded = cv2.copyMakeBorder(mask.astype(np.uint8), 1, 1, 1, 1, cv2.BORDER_CONSTANT, value=0)
    eroded = cv2.erode(padded, np.ones((3, 3), dtype=np.uint8), iterations=d)[1 : height + 1, 1 : width + 1]
    return mask.astype(bool) & ~eroded.astype(bool)


def reference_boundary_iou(pred: np.ndarray, gt: np.ndarray, ignore: np.ndarray) -> float:
    valid = ~ignore
    pred_band, gt_band = reference_boundary(pred), reference_boundary(gt)
    intersection = np.count_nonzero(pred_band & gt_band & valid)
    union = np.count_nonzero((pred_band | gt_band) & valid)
    return intersection / union if union else 1.0


def test_boundary_iou_matches_cheng_et_al_on_real_masks(hq_fixture):
    kernel = np.ones((7, 7), dtype=np.uint8)
    for item in hq_fixture:
        mask = np.array(PIL.Image.open(item["mask"]).convert("L"))
        gt, ignore = mask == 255, mask == 128
        assert gt.any(), item["id"]
        # Predictions with real shapes and their own boundaries: the object grown, shrunk and shifted.
        predictions = [
            cv2.dilate(gt.astype(np.uint8), kernel).astype(bool),
            cv2.erode(gt.astype(np.uint8), kernel).astype(bool),
            np.roll(gt, (9, -13), axis=(0, 1)),
        ]
        for pred in predictions:
            expected = reference_boundary_iou(pred, gt, ignore)
            assert boundary_iou(pred, gt, ignore=ignore).item() == pytest.approx(expected, abs=1e-12), item["id"]
        # The bands themselves agree pixel for pixel.
        from pasam_hf.boundary import mask_to_boundary

        assert np.array_equal(mask_to_boundary(torch.from_numpy(gt), 0.02).numpy(), reference_boundary(gt))


# ------------------------------------------------------------------------------------------- SegmentationMetrics
def filled_metrics() -> SegmentationMetrics:
    metrics = SegmentationMetrics()
    for image, iou, b_iou in (("a1", 1.0, 0.8), ("a2", 0.5, 0.4), ("a3", 0.0, 0.0)):
        metrics.add(image, iou=iou, boundary_iou=b_iou, subset="A")
    metrics.add("b1", iou=0.9, boundary_iou=0.6, subset="B", instance=2)
    return metrics


def test_mean_of_means_weights_every_subset_equally():
    metrics = filled_metrics()
    assert metrics.subsets() == ["A", "B"]
    means = metrics.subset_means()
    assert means["A"] == pytest.approx({"count": 3, "mean_iou": 0.5, "mean_boundary_iou": 0.4})
    assert means["B"] == pytest.approx({"count": 1, "mean_iou": 0.9, "mean_boundary_iou": 0.6})
    # (0.5 + 0.9) / 2, not the mean over the 4 objects (2.4 / 4 = 0.6).
    assert metrics.mean_of_means() == pytest.approx({"mean_iou": 0.7, "mean_boundary_iou": 0.5})


def test_empty_metrics_and_bad_scores():
    metrics = SegmentationMetrics()
    average = metrics.mean_of_means()
    assert math.isnan(average["mean_iou"]) and math.isnan(average["mean_boundary_iou"])
    metrics.skipped = 3
    assert "no object scored (3 instances" in metrics.summary_table()
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        metrics.add("x", iou=1.5, boundary_iou=0.5)


def test_add_masks_scores_each_mask_and_keeps_instance_numbers():
    gt = np.stack([square(8, 2, 6, 2, 6), square(8, 0, 8, 0, 8)])
    pred = np.stack([square(8, 4, 8, 4, 8), square(8, 0, 8, 0, 8)])
    metrics = SegmentationMetrics()
    metrics.add_masks("img", pred, gt, subset="S", instances=[3, 5])
    assert [(row["image"], row["instance"], row["subset"]) for row in metrics.rows] == [("img", 3, "S"), ("img", 5, "S")]
    assert [row["iou"] for row in metrics.rows] == pytest.approx([4 / 28, 1.0])
    assert metrics.rows[1]["boundary_iou"] == 1.0


def test_csv_and_json_hold_every_row_and_the_summary(tmp_path):
    metrics = filled_metrics()
    metrics.skipped = 2
    with metrics.to_csv(tmp_path / "objects.csv").open(newline="") as file:
        rows = list(csv.DictReader(file))
    assert list(rows[0]) == list(SegmentationMetrics.COLUMNS)
    assert [(row["subset"], row["image"], int(row["instance"]), float(row["iou"])) for row in rows] == [
        ("A", "a1", 0, 1.0), ("A", "a2", 0, 0.5), ("A", "a3", 0, 0.0), ("B", "b1", 2, 0.9)
    ]
    summary = json.loads(metrics.to_json(tmp_path / "metrics.json").read_text())
    assert summary["average"] == pytest.approx({"mean_iou": 0.7, "mean_boundary_iou": 0.5})
    assert summary["subsets"]["A"]["count"] == 3
    assert summary["num_scored"] == 4 and summary["num_skipped"] == 2
    assert summary["rows"] == metrics.rows
    # An evaluation that scored nothing writes null averages, which JSON can hold (NaN it cannot).
    empty = json.loads(SegmentationMetrics().to_json(tmp_path / "empty.json").read_text())
    assert empty["average"] == {"mean_iou": None, "mean_boundary_iou": None}


def test_summary_table_in_percent():
    lines = filled_metrics().summary_table().splitlines()
    assert lines[0].split() == ["Subset", "Objects", "mIoU", "mBIoU"]
    assert lines[2].split() == ["A", "3", "50.00", "40.00"]
    assert lines[3].split() == ["B", "1", "90.00", "60.00"]
    assert lines[4].split() == ["Average", "4", "70.00", "50.00"]


# ----------------------------------------------------------------------------------------- the evaluate module
@pytest.fixture(scope="module")
def evaluate_metric():
    return load_evaluate_metric()


def test_evaluate_module_matches_segmentation_metrics(evaluate_metric):
    rng = np.random.default_rng(0)
    gts = [square(40, 5, 30, 8, 33, height=30), square(24, 2, 20, 2, 12), square(16, 0, 16, 4, 16)]
    preds = [np.roll(gt, int(rng.integers(1, 4)), axis=1) for gt in gts]
    subsets = ["DIS", "DIS", "COIFT"]
    result = evaluate_metric.compute(
        predictions=[p.astype(np.uint8) for p in preds], references=[g.astype(np.uint8) for g in gts], subsets=subsets
    )
    expected = SegmentationMetrics()
    for index, (pred, gt, subset) in enumerate(zip(preds, gts, subsets)):
        expected.add_masks(str(index), pred, gt, subset=subset)
    assert result["num_objects"] == 3
    assert result["mean_iou"] == pytest.approx(expected.mean_of_means()["mean_iou"])
    assert result["mean_boundary_iou"] == pytest.approx(expected.mean_of_means()["mean_boundary_iou"])
    assert set(result["per_subset"]) == {"DIS", "COIFT"}
    for subset, means in expected.subset_means().items():
        assert result["per_subset"][subset] == pytest.approx(means)


def test_evaluate_module_hand_computed_with_void_and_batches(evaluate_metric):
    gt = square(8, 2, 6, 2, 6).astype(np.uint8)
    pred = square(8, 2, 6, 2, 4).astype(np.uint8)
    assert evaluate_metric.compute(predictions=[pred], references=[gt]) == pytest.approx(
        {"mean_iou": 0.5, "mean_boundary_iou": 6 / 14, "num_objects": 1}
    )
    # A prediction spilling into void pixels (columns 6-7): a perfect mask IoU. Its band (the 4x6 rectangle's ring,
    # 16 pixels) loses 6 void pixels; the 10 left are in gt's 12-pixel band, whose column 5 rows 3-4 are pred's
    # interior: 10 / 12.
    wide = square(8, 2, 6, 2, 8).astype(np.uint8)
    void = gt.copy()
    void[:, 6:8] = 255
    result = evaluate_metric.compute(predictions=[wide], references=[void])
    assert (result["mean_iou"], result["mean_boundary_iou"]) == pytest.approx((1.0, 10 / 12))
    # Without ignore_index the 255s are no mask value at all.
    with pytest.raises(ValueError, match="binary"):
        evaluate_metric.compute(predictions=[wide], references=[void], ignore_index=None)
    # Accumulated batches, subsets given at the end, one per object in order.
    evaluate_metric.add_batch(predictions=[pred], references=[gt])
    evaluate_metric.add_batch(predictions=[gt], references=[gt])
    result = evaluate_metric.compute(subsets=["x", "y"])
    assert result["per_subset"]["x"]["mean_iou"] == pytest.approx(0.5)
    assert result["per_subset"]["y"]["mean_iou"] == 1.0
    assert result["mean_iou"] == pytest.approx(0.75)


def test_evaluate_module_errors(evaluate_metric):
    gt = square(8, 2, 6, 2, 6).astype(np.uint8)
    with pytest.raises(ValueError, match="one subset name per object"):
        evaluate_metric.compute(predictions=[gt], references=[gt], subsets=["a", "b"])
    with pytest.raises(ValueError, match="binary"):
        evaluate_metric.compute(predictions=[gt * 3], references=[gt])


def test_evaluate_module_loads_by_path_and_ships_as_package_data():
    import evaluate

    script = METRIC_DIR / "pasam_segmentation.py"
    metric = evaluate.load(str(script))
    gt = square(8, 2, 6, 2, 6)
    assert metric.compute(predictions=[gt], references=[gt])["mean_iou"] == 1.0
    assert "HQSeg-44K" in metric.description
    # setup.cfg's package data must include the script and its card, or an installed wheel lacks them.
    config = configparser.ConfigParser()
    config.read(REPO_ROOT / "setup.cfg")
    patterns = [p.strip() for p in config["options.package_data"]["pasam_hf"].split(",")]
    package = REPO_ROOT / "src" / "pasam_hf"
    shipped = {path for pattern in patterns for path in package.glob(pattern)}
    assert {script, METRIC_DIR / "README.md"} <= shipped


def test_evaluate_module_refuses_0_255_references_loaded_by_path():
    """`references=[gt * 255]` with the default ignore_index=255 would void every object pixel and score any
    prediction 1; the module refuses it as mask_iou does, through evaluate.load as a user loads it."""
    import evaluate

    metric = evaluate.load(str(METRIC_DIR / "pasam_segmentation.py"))
    gt = square(8, 2, 6, 2, 6).astype(np.uint8)
    half = square(8, 2, 6, 2, 4).astype(np.uint8)
    with pytest.raises(ValueError, match="binary"):
        mask_iou(half, gt * 255)
    for prediction in (half, np.zeros_like(gt)):
        with pytest.raises(ValueError, match=r"references\[0\] holds no foreground.*0/255 mask.*mask > 127"):
            metric.compute(predictions=[prediction], references=[gt * 255])
    # Thresholded as the message says, it scores as expected; a reference with no object and no void is legal.
    assert metric.compute(predictions=[half], references=[(gt * 255 > 127).astype(np.uint8)])["mean_iou"] == 0.5
    empty = np.zeros_like(gt)
    assert metric.compute(predictions=[empty], references=[empty])["mean_iou"] == 1.0
