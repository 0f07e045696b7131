"""`pasam segment` end to end on a tiny random model saved to disk: files, sizes, masks equal to the in-process
model's, several images and prompts, --boxes-file, --explain, and every error a user can make."""

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

from pasam_hf import PASamModel, PASamProcessor
from pasam_hf.cli import main

# Pixels whose upsampled logit is this close to the threshold may flip between processes (thread counts change
# the order of float sums); everywhere else the CLI's mask must equal the in-process one exactly.
LOGIT_TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("segment")
    config = tiny_config()
    torch.manual_seed(0)
    PASamModel(config).save_pretrained(root / "model")
    PASamProcessor.from_model_config(config).save_pretrained(root / "model")
    PIL.Image.fromarray(synthetic_image(96, 128, seed=0)).save(root / "a.png")
    PIL.Image.fromarray(synthetic_image(120, 80, seed=1)).save(root / "b.png")
    PIL.Image.fromarray(synthetic_image(64, 64, seed=2)).convert("L").save(root / "c.jpg")
    return root


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    return subprocess.run([sys.executable, "-m", "pasam_hf", *args], cwd=cwd, capture_output=True, text=True,
                          env=env, timeout=300)


def in_process_masks(model_dir: Path, images: list[Path], **prompts) -> list[tuple[np.ndarray, np.ndarray]]:
    """`(mask, logits)` per image, `(P, H, W)` each, computed like the CLI does but in this process (one batch)."""
    model = PASamModel.from_pretrained(model_dir).eval()
    processor = PASamProcessor.from_pretrained(model_dir)
    pictures = [np.asarray(PIL.Image.open(path).convert("RGB")) for path in images]
    inputs = processor(images=pictures, return_tensors="pt", **prompts)
    keys = ("pixel_values", "adapter_pixel_values", "input_points", "input_labels", "input_boxes")
    with torch.no_grad():
        outputs = model(**{k: inputs[k] for k in keys if k in inputs}, multimask_output=False)
    logits = processor.post_process_masks(
        list(outputs.pred_masks), inputs["original_sizes"], inputs["reshaped_input_sizes"], binarize=False
    )
    return [((frame[:, 0] > 0).numpy(), frame[:, 0].numpy()) for frame in logits]


def read_mask(path: Path) -> np.ndarray:
    image = PIL.Image.open(path)
    assert image.mode == "L"
    values = np.asarray(image)
    assert set(np.unique(values).tolist()) <= {0, 255}
    return values == 255


def assert_same_mask(written: np.ndarray, expected: np.ndarray, logits: np.ndarray) -> None:
    assert written.shape == expected.shape
    decided = np.abs(logits) > LOGIT_TOLERANCE
    assert np.array_equal(written[decided], expected[decided])


def test_boxes_on_several_images_with_explain(workspace: Path) -> None:
    boxes = [[20.0, 10.0, 100.0, 80.0], [5.0, 5.0, 60.0, 70.0]]
    result = run_cli("segment", "a.png", "b.png", "--box", *map(str, boxes[0]), "--box", *map(str, boxes[1]),
                     "--model", "model", "--out", "out1", "--explain", "--batch-size", "2", cwd=workspace)
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    out = workspace / "out1"
    assert "wrote 4 masks for 2 images to out1" in result.stdout
    assert "a.png -> out1/a_mask_0.png" in result.stdout

    expected = in_process_masks(workspace / "model", [workspace / "a.png", workspace / "b.png"],
                                input_boxes=[boxes, boxes])
    for stem, (height, width), (masks, logits) in zip("ab", [(96, 128), (120, 80)], expected):
        for prompt in range(2):
            written = read_mask(out / f"{stem}_mask_{prompt}.png")
            assert written.shape == (height, width)
            assert_same_mask(written, masks[prompt], logits[prompt])
            explain = PIL.Image.open(out / f"{stem}_explain_{prompt}.png")
            # five tiles side by side, as wide as the image's aspect ratio makes them
            assert explain.width > 4 * explain.height * width / height
        overlay = PIL.Image.open(out / f"{stem}_overlay.png")
        assert overlay.size == (width, height) and overlay.mode == "RGB"
        image = np.asarray(PIL.Image.open(workspace / f"{stem}.png").convert("RGB"))
        assert not np.array_equal(np.asarray(overlay), image)  # the box prompts at least are drawn
    assert sorted(path.name for path in out.iterdir()) == sorted(
        f"{stem}_{kind}{suffix}.png" for stem in "ab" for kind, suffix in
        [("mask", "_0"), ("mask", "_1"), ("explain", "_0"), ("explain", "_1"), ("overlay", "")]
    )


def test_points_boxes_file_and_grayscale_image(workspace: Path) -> None:
    (workspace / "boxes.json").write_text(json.dumps({"a.png": [[20, 10, 100, 80]]}))
    result = run_cli("segment", "a.png", "c.jpg", "--point", "40", "30", "--negative-point", "10", "50",
                     "--boxes-file", "boxes.json", "--model", "model", "--out", "out2", cwd=workspace)
    assert result.returncode == 0, result.stderr
    out = workspace / "out2"
    assert sorted(path.name for path in out.iterdir()) == [
        "a_mask.png", "a_overlay.png", "c_mask.png", "c_overlay.png"
    ]
    points = dict(input_points=[[[[40.0, 30.0], [10.0, 50.0]]]], input_labels=[[[1, 0]]])
    (a_masks, a_logits), = in_process_masks(workspace / "model", [workspace / "a.png"],
                                            input_boxes=[[[20.0, 10.0, 100.0, 80.0]]], **points)
    (c_masks, c_logits), = in_process_masks(workspace / "model", [workspace / "c.jpg"], **points)
    assert_same_mask(read_mask(out / "a_mask.png"), a_masks[0], a_logits[0])
    assert_same_mask(read_mask(out / "c_mask.png"), c_masks[0], c_logits[0])
    assert PIL.Image.open(out / "c_overlay.png").size == (64, 64)


def test_error_exits_two_with_one_line_and_no_traceback(workspace: Path) -> None:
    result = run_cli("segment", "missing.png", "--box", "1", "1", "5", "5", "--model", "model", "--out", "o",
                     cwd=workspace)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if "error" in line]
    assert errors == ["pasam segment: error: image missing.png does not exist; check the path."]


@pytest.mark.parametrize(
    ("arguments", "expected"),
    [
        (["missing.png", "--box", "1", "1", "5", "5"], "image missing.png does not exist"),
        (["notes.png", "--box", "1", "1", "5", "5"], "cannot be read"),
        (["a.png", "--box", "500", "500", "600", "600"], "a.png: box 1 is [500, 500, 600, 600], entirely outside"),
        (["a.png", "--box", "90", "80", "10", "5"], "a.png: box 1 is [90, 80, 10, 5]: x1 < x0"),
        (["a.png", "--point", "400", "5"], "a.png: the points has a point at (x=400, y=5) outside"),
        (["a.png"], "no prompt for a.png: give --box"),
        (["a.png", "--box", "1", "1", "5", "5", "--box", "2", "2", "9", "9", "--point", "3", "3"],
         "combine them with at most one box"),
        (["a.png", "--boxes-file", "broken.json"], "is not valid JSON"),
        (["a.png", "--boxes-file", "wrong.json"], "the entry for 'a.png' is [1, 2, 3]"),
        (["a.png", "--boxes-file", "absent.json"], "--boxes-file absent.json does not exist"),
        (["a.png", "--box", "1", "1", "5", "5", "--model", "someone/no-such-model"], "Hub is unreachable"),
        (["a.png", "--box", "1", "1", "5", "5", "--model", "./no-such-dir"], "model directory ./no-such-dir does not"),
        (["a.png", "--box", "1", "1", "5", "5", "--batch-size", "0"], "--batch-size is 0; use 1 or more"),
        (["a.png", "--box", "1", "1", "5", "5", "--device", "warp9"], "--device 'warp9' is not a torch device"),
        (["a.png", "--box", "1", "1", "5", "5", "--out", "a.png"], "--out a.png is a file"),
    ],
)
def test_user_errors(workspace: Path, monkeypatch, capsys, arguments: list[str], expected: str) -> None:
    monkeypatch.chdir(workspace)
    (workspace / "notes.png").write_text("not an image")
    (workspace / "broken.json").write_text("{'a.png': ")
    (workspace / "wrong.json").write_text(json.dumps({"a.png": [1, 2, 3]}))
    if "--model" not in arguments:
        arguments = [*arguments, "--model", "model"]
    if "--out" not in arguments:
        arguments = [*arguments, "--out", "errors-out"]
    assert main(["segment", *arguments]) == 2
    stderr = capsys.readouterr().err
    first, *rest = stderr.splitlines()
    assert first.startswith("pasam segment: error: ") and expected in first, first
    assert all("error" not in line for line in rest) and "Traceback" not in stderr


def test_clipped_box_is_a_one_line_warning(workspace: Path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(workspace)
    assert main(["segment", "a.png", "--box", "100", "50", "200", "90", "--model", "model", "--out", "o3"]) == 0
    captured = capsys.readouterr()
    warnings = [line for line in captured.err.splitlines() if "warning" in line]
    assert warnings == ["pasam segment: warning: a.png: box 1 reached outside the image and were clipped to it; "
                        "pass boxes inside the image to silence this warning."]
    assert read_mask(workspace / "o3" / "a_mask.png").shape == (96, 128)
