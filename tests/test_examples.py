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


def _tiny_sam_dir(directory: Path) -> Path:
    """A tiny plain SAM checkpoint laid out as the Hub's SAM repos are: config.json (model_type 'sam'),
    model.safetensors and SAM's preprocessor_config.json (SamImageProcessor at the model's 128-pixel size)."""
    from conftest import tiny_config
    from transformers import SamConfig, SamImageProcessor, SamModel

    pasam = tiny_config()
    sam_config = SamConfig(
        vision_config=pasam.vision_config.to_dict(),
        prompt_encoder_config=pasam.prompt_encoder_config.to_dict(),
        mask_decoder_config={
            key: getattr(pasam.mask_decoder_config, key)
            for key in ("hidden_size", "mlp_dim", "num_attention_heads", "iou_head_hidden_dim")
        },
    )
    torch.manual_seed(0)
    SamModel(sam_config).save_pretrained(directory)
    SamImageProcessor(
        size={"longest_edge": 128}, pad_size={"height": 128, "width": 128}, mask_size={"longest_edge": 32},
        mask_pad_size={"height": 32, "width": 32},
    ).save_pretrained(directory)
    return directory


def test_trainer_example_takes_a_sam_checkpoint_and_says_load_errors_in_one_line(tmp_path: Path) -> None:
    sam_dir = _tiny_sam_dir(tmp_path / "sam")
    data = tmp_path / "data"
    (data / "images").mkdir(parents=True)
    (data / "masks").mkdir()
    for index in range(2):
        image = np.full((48, 64, 3), 40, dtype=np.uint8)
        image[10:40, 10 + 10 * index : 50] = 220
        PIL.Image.fromarray(image).save(data / "images" / f"{index}.png")
        PIL.Image.fromarray(np.where(image[..., 0] > 128, 255, 0).astype(np.uint8)).save(data / "masks" / f"{index}.png")
    out = tmp_path / "out"
    result = run_example("trainer.py", "--model", str(sam_dir), "--data", str(data), "--output-dir", str(out),
                         "--max-steps", "1", "--batch-size", "2")
    assert "1 steps, training loss" in result.stdout
    assert PASamModel.from_pretrained(out).config.model_type == "pa_sam"

    missing = subprocess.run(
        [sys.executable, str(EXAMPLES / "trainer.py"), "--model", str(tmp_path / "nowhere")],
        check=False, capture_output=True, text=True, timeout=300, env=ENV, cwd=REPO,
    )
    assert missing.returncode == 2 and "Traceback" not in missing.stderr, missing.stderr[-2000:]
    errors = [line for line in missing.stderr.splitlines() if line.startswith("trainer.py: error:")]
    assert len(errors) == 1 and "does not exist" in errors[0], missing.stderr[-2000:]
