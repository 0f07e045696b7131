#!/usr/bin/env python
"""Segment everything in an image with `pipeline("mask-generation")`: SAM's automatic mask generator, run through
PA-SAM's adapter (a grid of point prompts, masks filtered by predicted IoU and stability, de-duplicated by NMS).

    python examples/pipeline.py --model ./pa-sam-vit-l --image photo.jpg
    python examples/pipeline.py --tiny                   # tiny random model and a procedural image: seconds

`--model` is a PA-SAM directory or Hub id; importing `pasam_hf` registers PA-SAM with the Auto classes, which is
all the pipeline needs. `--tiny` saves a tiny random model to a temporary directory and loads it from there, as a
real checkpoint would be; its masks are meaningless, so its filters are switched off. Needs torchvision (NMS).
The cells (`# %%`) run one by one in VS Code, PyCharm or Jupyter (jupytext).
"""

# %% Imports and arguments
import argparse
import tempfile
from pathlib import Path

import numpy as np
import PIL.Image
import torch
from transformers import pipeline

import pasam_hf  # noqa: F401 - registers PA-SAM with AutoModelForMaskGeneration and AutoProcessor
from pasam_hf import PASamConfig, PASamModel, PASamProcessor
from pasam_hf.synthetic import thin_structure_sample
from pasam_hf.visualization import color_overlay

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--model", help="PA-SAM checkpoint directory or Hub id")
parser.add_argument("--tiny", action="store_true", help="use a tiny randomly initialised model (no download)")
parser.add_argument("--image", help="image file (default: a procedural thin-structure image)")
parser.add_argument("--points-per-side", type=int, default=None,
                    help="grid of N x N point prompts (default: 32, or 4 with --tiny)")
parser.add_argument("--points-per-batch", type=int, default=64, help="point prompts per forward pass of the decoder")
parser.add_argument("--out", default=None, help="output directory (default: a new temporary directory)")
args = parser.parse_args()
if not args.tiny and args.model is None:
    parser.error("pass --model DIR_OR_HUB_ID (a PA-SAM checkpoint), or --tiny for a tiny random model")
out = Path(args.out or tempfile.mkdtemp(prefix="pasam-pipeline-"))
out.mkdir(parents=True, exist_ok=True)

# %% A checkpoint directory (with --tiny: a tiny random one, saved like a real one)
model_id = args.model
if args.tiny:
    torch.manual_seed(0)
    config = PASamConfig.small(image_size=128)
    model_id = str(out / "tiny-pa-sam")
    PASamModel(config).save_pretrained(model_id)
    PASamProcessor.from_model_config(config).save_pretrained(model_id)

# %% The pipeline
device = 0 if torch.cuda.is_available() else "cpu"
generator = pipeline("mask-generation", model=model_id, device=device)
print(f"pipeline model: {type(generator.model).__name__} from {model_id}")

# %% Image
if args.image:
    image = PIL.Image.open(args.image).convert("RGB")
else:
    pixels, _ = thin_structure_sample(np.random.default_rng(0), size=256)
    image = PIL.Image.fromarray(pixels)

# %% Automatic masks
# The thresholds are SAM's defaults; a random model predicts low IoU everywhere, so --tiny keeps every mask.
filters = {"pred_iou_thresh": 0.0, "stability_score_thresh": 0.0} if args.tiny else {}
result = generator(
    image,
    points_per_crop=args.points_per_side or (4 if args.tiny else 32),
    points_per_batch=args.points_per_batch,
    **filters,
)
masks, scores = result["masks"], result["scores"]      # list of (H, W) bool arrays, predicted IoU per mask
scores_text = f", predicted IoU {float(max(scores)):.3f} to {float(min(scores)):.3f}" if masks else ""
print(f"{len(masks)} masks{scores_text}")

# %% Save every mask in its own colour over the image
if masks:
    color_overlay(masks, image=image).save(out / "masks.png")
    print(f"wrote {out / 'masks.png'}")
