"""The scripts in examples/ run end to end with `--tiny` (a tiny random model, no download) as subprocesses."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch

from pasam_hf import PASamConfig, PASamModel
from pasam_hf.training import mark_trainable

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples"
# One intra-op thread: tiny models gain nothing from more, and the tests share the machine.
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


def run_example(name: str, *args: str) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / name), *args],
        check=False, capture_output=True, text=True, timeout=300, env=ENV, cwd=REPO,
    )
    assert result.returncode == 0, f"{name} failed:\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}"
    return result


def test_inference_example_writes_a_mask_at_the_image_size(tmp_path: Path) -> None:
    image = np.zeros((90, 140, 3), dtype=np.uint8)
    image[30:60, 40:100] = 200
    PIL.Image.fromarray(image).save(tmp_path / "photo.png")
    result = run_example(
        "inference.py", "--tiny", "--image", str(tmp_path / "photo.png"), "--box", "35", "25", "105", "65",
        "--point", "70", "45", "--out", str(tmp_path / "out"),
    )
    with PIL.Image.open(tmp_path / "out" / "mask.png") as mask:
        assert mask.size == (140, 90) and set(np.unique(np.asarray(mask))) <= {0, 255}
    with PIL.Image.open(tmp_path / "out" / "overlay.png") as overlay:
        assert overlay.size == (140, 90) and overlay.mode == "RGB"
    assert "mask: 140x90" in result.stdout


def test_inference_example_needs_a_model_or_tiny() -> None:
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / "inference.py")], check=False, capture_output=True, text=True, timeout=120,
        env=ENV,
    )
    assert result.returncode == 2 and "--model" in result.stderr


@pytest.mark.skipif(importlib.util.find_spec("torchvision") is None, reason="the pipeline's NMS needs torchvision")
def test_pipeline_example_generates_masks(tmp_path: Path) -> None:
    result = run_example("pipeline.py", "--tiny", "--out", str(tmp_path))
    assert "pipeline model: PASamModel" in result.stdout
    # The tiny checkpoint is saved like a real one and loads back.
    assert (tmp_path / "tiny-pa-sam" / "model.safetensors").is_file()
    with PIL.Image.open(tmp_path / "masks.png") as picture:
        assert picture.size == (256, 256)


def test_trainer_example_fine_tunes_and_saves_a_loadable_model(tmp_path: Path) -> None:
    result = run_example("trainer.py", "--tiny", "--output-dir", str(tmp_path), "--max-steps", "2")
    assert "2 steps, training loss" in result.stdout
    trained = PASamModel.from_pretrained(tmp_path).state_dict()
    assert (tmp_path / "processor_config.json").is_file()
    # The script's starting point (same seed and config): the release's trainable set moved, nothing else did.
    torch.manual_seed(0)
    initial = PASamModel(PASamConfig.small(image_size=128, edge_mode="rgb")).state_dict()
    trainable = set(mark_trainable(PASamModel(PASamConfig.small(image_size=128, edge_mode="rgb"))))
    changed = {name for name, tensor in initial.items() if not torch.equal(tensor, trained[name])}
    assert changed and changed <= trainable, sorted(changed - trainable)
    assert any(name.startswith("mask_decoder.prompt_adapter.") for name in changed)
