#!/usr/bin/env python
"""Segment one object with PA-SAM from a box and points: processor -> model -> post_process_masks -> PNG.

    python examples/inference.py --model ./pa-sam-vit-l --image photo.jpg --box 75 275 1725 850 --point 900 500
    python examples/inference.py --tiny                  # tiny random model and a procedural image: runs in seconds

`--model` is a PA-SAM directory (from `pasam convert` or `save_pretrained`) or a Hub id. `--tiny` needs neither a
model nor an image; its mask is random (the weights are), but every step below runs exactly as with real weights.
The cells (`# %%`) run one by one in VS Code, PyCharm or Jupyter (jupytext).
"""

# %% Imports and arguments
import argparse
import tempfile
from pathlib import Path

import numpy as np
import PIL.Image
import torch

from pasam_hf import PASamConfig, PASamModel, PASamProcessor
from pasam_hf.synthetic import thin_structure_sample
from pasam_hf.visualization import overlay_masks

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--model", help="PA-SAM checkpoint directory or Hub id")
parser.add_argument("--tiny", action="store_true", help="use a tiny randomly initialised model (no download)")
parser.add_argument("--image", help="image file (default: a procedural thin-structure image)")
parser.add_argument("--box", nargs=4, type=float, metavar=("X0", "Y0", "X1", "Y1"), help="box prompt in pixels")
parser.add_argument("--point", nargs=2, type=float, action="append", metavar=("X", "Y"),
                    help="foreground point in pixels (repeatable)")
parser.add_argument("--out", default=None, help="output directory (default: a new temporary directory)")
args = parser.parse_args()
if not args.tiny and args.model is None:
    parser.error("pass --model DIR_OR_HUB_ID (a PA-SAM checkpoint), or --tiny for a tiny random model")

# %% Model and processor
if args.tiny:
    torch.manual_seed(0)
    config = PASamConfig.small(image_size=128)           # random weights, 128 px input
    model = PASamModel(config)
    processor = PASamProcessor.from_model_config(config)  # sizes and edge mode that match the config
else:
    model = PASamModel.from_pretrained(args.model)
    processor = PASamProcessor.from_pretrained(args.model)
model.eval()

# %% Image and prompts (pixels of the original image)
if args.image:
    image = PIL.Image.open(args.image).convert("RGB")
else:
    pixels, _ = thin_structure_sample(np.random.default_rng(0), size=256)
    image = PIL.Image.fromarray(pixels)
width, height = image.size
box = args.box or [0.1 * width, 0.1 * height, 0.9 * width, 0.9 * height]
points = args.point or [[width / 2, height / 2]]

# %% Forward pass
# One image, one prompt made of one box and its points: boxes are [image][prompt][4], points
# [image][prompt][point][2], labels [image][prompt][point] (1 foreground, 0 background).
inputs = processor(
    images=image,
    input_boxes=[[box]],
    input_points=[[points]],
    input_labels=[[[1] * len(points)]],
    return_tensors="pt",
)
with torch.inference_mode():
    outputs = model(**inputs)                           # pred_masks (1, 1, 1, 256, 256) logits, iou_scores, ...

# %% Back to the image's size
# post_process_masks removes the padding, resizes to the original image and thresholds the logits at 0.
masks = processor.post_process_masks(outputs.pred_masks, inputs["original_sizes"], inputs["reshaped_input_sizes"])
mask = masks[0][0, 0].numpy()                            # (height, width) bool: image 0, prompt 0, mask 0
print(f"mask: {mask.shape[1]}x{mask.shape[0]}, {mask.mean():.1%} of the image, "
      f"predicted IoU {outputs.iou_scores[0, 0, 0].item():.3f}")

# %% Save the mask and an overlay
out = Path(args.out or tempfile.mkdtemp(prefix="pasam-inference-"))
out.mkdir(parents=True, exist_ok=True)
PIL.Image.fromarray(mask.astype(np.uint8) * 255).save(out / "mask.png")
overlay_masks(image, mask, boxes=[box], points=points).save(out / "overlay.png")
print(f"wrote {out / 'mask.png'} and {out / 'overlay.png'}")
