"""A plain SAM checkpoint laid out as the Hub's SAM repos are (`config.json` with model_type sam, `model.safetensors`,
and SAM's own processor config naming `SamImageProcessor`), taken through every command that loads a model, and
through `PASamProcessor.from_pretrained` as a Python user would (`PASamProcessor.from_pretrained("facebook/sam-vit-base")`).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import synthetic_image, tiny_config
from PIL import Image
from transformers import SamConfig, SamModel, SamProcessor
from transformers.models.sam.image_processing_pil_sam import SamImageProcessorPil
from transformers.models.sam.image_processing_sam import SamImageProcessor

from pasam_hf import PASamImageProcessor, PASamModel, PASamProcessor
from pasam_hf.image_processing_pasam import PASamImageProcessorPil

REPO = Path(__file__).resolve().parents[1]
SAM_SIZES = dict(
    size={"longest_edge": 128},
    pad_size={"height": 128, "width": 128},
    mask_size={"longest_edge": 32},
    mask_pad_size={"height": 32, "width": 32},
)


def write_sam_repo(directory: Path, processor_file: str = "preprocessor_config.json") -> Path:
    """A tiny random `SamModel` saved as the Hub's SAM repos are.

    `preprocessor_config.json` is what the Hub's facebook/sam-vit-* repos hold (the image processor's settings with
    `processor_class`); `processor_config.json` is what `SamProcessor.save_pretrained` writes in transformers 5."""
    small = tiny_config()
    config = SamConfig(
        vision_config=small.vision_config.to_dict(),
        prompt_encoder_config=small.prompt_encoder_config.to_dict(),
        mask_decoder_config=dict(hidden_size=32, mlp_dim=64, num_attention_heads=2, iou_head_hidden_dim=32),
    )
    torch.manual_seed(0)
    SamModel(config).save_pretrained(directory)
    if processor_file == "processor_config.json":
        SamProcessor(image_processor=SamImageProcessor(**SAM_SIZES)).save_pretrained(directory)
    else:
        SamImageProcessor(**SAM_SIZES).save_pretrained(directory)
        path = directory / "preprocessor_config.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), "processor_class": "SamProcessor"}, indent=2))
    assert json.loads((directory / processor_file).read_text()) and (directory / "config.json").is_file()
    return directory


def write_pairs(root: Path, count: int = 4) -> Path:
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for index in range(count):
        image = synthetic_image(96, 128, seed=index)
        mask = (image[..., 0] > 150).astype(np.uint8) * 255
        Image.fromarray(image).save(root / "images" / f"s{index}.png")
        Image.fromarray(mask).save(root / "masks" / f"s{index}.png")
    return root


@pytest.mark.parametrize("processor_file", ["preprocessor_config.json", "processor_config.json"])
def test_pasam_processor_from_a_sam_repo_is_pa_sam(tmp_path: Path, processor_file: str) -> None:
    sam_dir = write_sam_repo(tmp_path / "sam", processor_file)
    processor = PASamProcessor.from_pretrained(sam_dir)
    assert isinstance(processor.image_processor, PASamImageProcessor)
    # SAM's settings are kept; the adapter input is a quarter of the model input, as 256 is of 1024.
    assert processor.image_processor.pad_size["height"] == 128 and processor.image_processor.adapter_size == 32
    inputs = processor(images=synthetic_image(), input_boxes=[[[10, 10, 90, 70]]], return_tensors="pt")
    assert tuple(inputs["adapter_pixel_values"].shape) == (1, 4, 32, 32)
    # The model built from the same repo takes these inputs, and they equal its own computation of the adapter input.
    model = PASamModel.from_sam_pretrained(sam_dir).eval()
    torch.testing.assert_close(model.compute_adapter_pixel_values(inputs["pixel_values"]), inputs["adapter_pixel_values"])
    with torch.no_grad():
        model(**{key: inputs[key] for key in ("pixel_values", "adapter_pixel_values", "input_boxes")})
    # Saved again, it is a PA-SAM processor config.
    processor.save_pretrained(tmp_path / "saved")
    assert isinstance(PASamProcessor.from_pretrained(tmp_path / "saved").image_processor, PASamImageProcessor)
    # SAM's image processor passed by hand is upgraded too, keeping its backend.
    assert isinstance(PASamProcessor(image_processor=SamImageProcessorPil(**SAM_SIZES)).image_processor,
                      PASamImageProcessorPil)


def test_sam_repo_without_processor_config_gets_the_models_sizes(tmp_path: Path) -> None:
    from pasam_hf.loading import load_model_and_processor

    sam_dir = write_sam_repo(tmp_path / "sam")
    (sam_dir / "preprocessor_config.json").unlink()
    model, processor = load_model_and_processor(str(sam_dir))
    assert processor.image_processor.pad_size["height"] == model.config.vision_config.image_size == 128
    inputs = processor(images=synthetic_image(), input_boxes=[[[10, 10, 90, 70]]], return_tensors="pt")
    with torch.no_grad():
        model(**{key: inputs[key] for key in ("pixel_values", "adapter_pixel_values", "input_boxes")})


def _pasam(*args: str, cwd: Path) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, "-m", "pasam_hf", *args], cwd=cwd, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def test_every_command_takes_a_sam_repo(tmp_path: Path) -> None:
    """The README's recipe with `--model <SAM repo>`: train, cache, evaluate, generate and segment."""
    sam = str(write_sam_repo(tmp_path / "sam"))
    data = str(write_pairs(tmp_path / "data"))
    image = str(Path(data) / "images" / "s0.png")
    train_flags = ["--batch-size", "2", "--report-to", "none", "--no-progress", "--max-instances-per-image", "1"]
    # Independent commands run side by side: each mostly waits on imports.
    runs = {
        "train": _pasam("train", "--data", data, "--model", sam, "--output-dir", "run", "--max-steps", "2",
                        *train_flags, cwd=tmp_path),
        "cache": _pasam("cache", "--data", data, "--model", sam, "--out", "cache", "--views", "1", "--device", "cpu",
                        cwd=tmp_path),
        "evaluate": _pasam("evaluate", "--data", data, "--model", sam, "--out", "eval", cwd=tmp_path),
        "generate": _pasam("generate", image, "--model", sam, "--out", "generated", "--points-per-side", "2",
                           "--pred-iou-thresh", "0", "--stability-score-thresh", "0", cwd=tmp_path),
        "segment": _pasam("segment", image, "--model", sam, "--box", "10", "10", "90", "70", "--out", "segmented",
                          cwd=tmp_path),
    }
    results = {name: (process.wait(timeout=600), *process.communicate()) for name, process in runs.items()}
    for name, (code, out, err) in results.items():
        assert code == 0, (name, err[-3000:])
    assert "after 2 steps" in results["train"][1]
    assert isinstance(PASamProcessor.from_pretrained(tmp_path / "run").image_processor, PASamImageProcessor)
    assert json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert any((tmp_path / "generated").iterdir()) and any((tmp_path / "segmented").iterdir())
    # Training from the cache made with the SAM repo (the same command line, run in this process).
    from pasam_hf.cli import main

    assert main(["train", "--embedding-cache", str(tmp_path / "cache"), "--model", sam, "--output-dir",
                 str(tmp_path / "cached"), "--max-steps", "1", *train_flags]) == 0
