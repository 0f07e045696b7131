"""`pasam generate` (automatic masks through `pipeline("mask-generation")`) on a tiny random model saved to disk:
the overlay, one PNG per mask and the COCO RLE JSON agree with each other and with the pipeline run in this
process; RLE encoding round-trips; user errors are one line with exit code 2."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from conftest import synthetic_image, tiny_config
from transformers import pipeline

from pasam_hf import PASamModel, PASamProcessor
from pasam_hf.cli import main
from pasam_hf.cli.generate import bounding_box, rle_decode, uncompressed_rle

# Thresholds at 0 keep every mask of the random model, so the files have something to agree on.
KEEP_ALL = ("--pred-iou-thresh", "0", "--stability-score-thresh", "0", "--points-per-side", "4",
            "--points-per-batch", "8")


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("generate")
    config = tiny_config()
    torch.manual_seed(0)
    PASamModel(config).save_pretrained(root / "model")
    PASamProcessor.from_model_config(config).save_pretrained(root / "model")
    PIL.Image.fromarray(synthetic_image(96, 128, seed=0)).save(root / "a.png")
    return root


def test_generate_writes_consistent_files(workspace: Path) -> None:
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    result = subprocess.run(
        [sys.executable, "-m", "pasam_hf", "generate", "a.png", "--model", "model", "--out", "out", *KEEP_ALL],
        cwd=workspace, capture_output=True, text=True, env=env, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    out = workspace / "out"
    overlay = PIL.Image.open(out / "a_masks.png")
    assert overlay.size == (128, 96)
    document = json.loads((out / "a_masks.json").read_text())
    assert document["image"] == {"file_name": "a.png", "height": 96, "width": 128}
    annotations = document["annotations"]
    pngs = sorted((out / "a_masks").glob("*.png"))
    assert len(annotations) == len(pngs) > 0
    scores = [a["score"] for a in annotations]
    assert scores == sorted(scores, reverse=True)
    for annotation, png in zip(annotations, pngs):
        written = np.asarray(PIL.Image.open(png)) == 255
        assert written.shape == (96, 128)
        segmentation = annotation["segmentation"]
        if isinstance(segmentation["counts"], str):
            from pycocotools import mask as coco_mask

            decoded = coco_mask.decode({"size": segmentation["size"], "counts": segmentation["counts"].encode()})
        else:
            decoded = rle_decode(segmentation)
        assert np.array_equal(decoded.astype(bool), written)
        assert annotation["area"] == int(written.sum())
        assert annotation["bbox"] == bounding_box(written)

    # The same masks as the pipeline gives in this process (the set of masks; order is by score in both).
    model = PASamModel.from_pretrained(workspace / "model").eval()
    processor = PASamProcessor.from_pretrained(workspace / "model")
    generator = pipeline("mask-generation", model=model, image_processor=processor.image_processor, device="cpu")
    expected = generator(PIL.Image.open(workspace / "a.png").convert("RGB"), points_per_batch=8, points_per_crop=4,
                         pred_iou_thresh=0, stability_score_thresh=0)
    assert len(expected["masks"]) == len(pngs)
    assert sorted(int(np.asarray(m).sum()) for m in expected["masks"]) == sorted(a["area"] for a in annotations)


@pytest.mark.parametrize("seed", range(5))
def test_uncompressed_rle_round_trips(seed: int) -> None:
    rng = np.random.default_rng(seed)
    mask = rng.random((7 + seed, 5 + 2 * seed)) < 0.3
    mask[0, 0] = bool(seed % 2)  # a leading foreground pixel needs the zero-length first run
    rle = uncompressed_rle(mask)
    assert rle["size"] == list(mask.shape)
    assert sum(rle["counts"]) == mask.size
    assert np.array_equal(rle_decode(rle), mask)


def test_uncompressed_rle_matches_pycocotools() -> None:
    coco_mask = pytest.importorskip("pycocotools.mask")
    mask = np.zeros((6, 9), dtype=bool)
    mask[1:4, 2:7] = True
    mask[0, 0] = True
    ours = coco_mask.frPyObjects(uncompressed_rle(mask), *mask.shape)
    assert np.array_equal(coco_mask.decode(ours).astype(bool), mask)


def test_bounding_box() -> None:
    mask = np.zeros((10, 12), dtype=bool)
    assert bounding_box(mask) == [0, 0, 0, 0]
    mask[2:5, 3:9] = True
    assert bounding_box(mask) == [3, 2, 6, 3]


@pytest.mark.parametrize(
    ("arguments", "expected"),
    [
        (["missing.png"], "image missing.png does not exist"),
        (["a.png", "--points-per-batch", "0"], "--points-per-batch must be at least 1"),
        (["a.png", "--points-per-side", "0"], "--points-per-side must be at least 1"),
        (["a.png", "--pred-iou-thresh", "1.5"], "--pred-iou-thresh is a predicted IoU"),
        (["a.png", "--stability-score-thresh", "-1"], "--stability-score-thresh must be in [0, 1]"),
        (["a.png", "--model", "./no-such-dir"], "model directory ./no-such-dir does not"),
        (["a.png", "--out", "a.png"], "--out a.png is a file"),
    ],
)
def test_user_errors(workspace: Path, monkeypatch, capsys, arguments: list[str], expected: str) -> None:
    monkeypatch.chdir(workspace)
    if "--model" not in arguments:
        arguments = [*arguments, "--model", "model"]
    if "--out" not in arguments:
        arguments = [*arguments, "--out", "errors-out"]
    assert main(["generate", *arguments]) == 2
    stderr = capsys.readouterr().err
    first, *rest = stderr.splitlines()
    assert first.startswith("pasam generate: error: ") and expected in first, first
    assert all("error" not in line for line in rest) and "Traceback" not in stderr
