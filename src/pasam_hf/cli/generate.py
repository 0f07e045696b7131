"""`pasam generate`: segment everything in an image with `pipeline("mask-generation")` (SAM's automatic mask
generator: a grid of point prompts, filtered by predicted IoU and stability, de-duplicated by NMS).

For every image it writes, into `--out`:

- `<stem>_masks.png`: every mask in its own colour over the image;
- `<stem>_masks/000.png`, `001.png`, ...: each mask at the image's size, 0 background and 255 foreground, highest
  predicted IoU first;
- `<stem>_masks.json`: the masks as COCO run-length encodings (`{"size": [H, W], "counts": ...}`, the format of
  `pycocotools.mask`), with `area`, `bbox` (`[x, y, width, height]`) and the predicted IoU as `score`.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np
import PIL.Image

from . import CLIError
from .segment import (
    add_model_arguments,
    image_size,
    load_model,
    mask_image,
    output_stems,
    prepare_output_dir,
    progress,
    resolve_device,
    save_png,
)


def rle_encode(mask: np.ndarray) -> dict[str, Any]:
    """COCO run-length encoding of a binary `(H, W)` mask, JSON-ready.

    With pycocotools installed (the `coco` extra) this is its compressed RLE (`counts` a string); otherwise the
    uncompressed COCO RLE: `counts` lists run lengths over the pixels in column-major (Fortran) order, starting with
    a run of zeros (possibly of length 0). `pycocotools.mask.frPyObjects` reads either.
    """
    binary = np.asfortranarray(mask.astype(np.uint8))
    height, width = binary.shape
    try:
        from pycocotools import mask as coco_mask
    except ImportError:
        return uncompressed_rle(binary)
    encoded = coco_mask.encode(binary)
    return {"size": [height, width], "counts": encoded["counts"].decode("ascii")}


def uncompressed_rle(mask: np.ndarray) -> dict[str, Any]:
    """Uncompressed COCO RLE of a binary `(H, W)` mask: column-major run lengths, the first one counting zeros."""
    flat = np.asarray(mask, dtype=bool).ravel(order="F")
    # Positions where the value changes, with the ends; a leading 1 gives a first zero-run of length 0.
    changes = np.flatnonzero(np.diff(flat.astype(np.int8))) + 1
    boundaries = np.concatenate([[0], changes, [flat.size]])
    counts = np.diff(boundaries).tolist()
    if flat.size and flat[0]:
        counts = [0] + counts
    return {"size": list(mask.shape), "counts": counts}


def rle_decode(rle: dict[str, Any]) -> np.ndarray:
    """Inverse of [`uncompressed_rle`]: a boolean `(H, W)` mask from uncompressed COCO RLE."""
    height, width = rle["size"]
    values = np.zeros(len(rle["counts"]), dtype=bool)
    values[1::2] = True
    flat = np.repeat(values, rle["counts"])
    if flat.size != height * width:
        raise ValueError(f"RLE counts sum to {flat.size}, not {height}x{width} = {height * width} pixels.")
    return flat.reshape((height, width), order="F")


def bounding_box(mask: np.ndarray) -> list[int]:
    """COCO `[x, y, width, height]` of a binary mask (all zeros for an empty one)."""
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    if not len(rows):
        return [0, 0, 0, 0]
    return [int(cols[0]), int(rows[0]), int(cols[-1] - cols[0] + 1), int(rows[-1] - rows[0] + 1)]


def coco_annotations(masks: list[np.ndarray], scores: list[float]) -> list[dict[str, Any]]:
    return [
        {
            "id": index,
            "segmentation": rle_encode(mask),
            "area": int(mask.sum()),
            "bbox": bounding_box(mask),
            "score": float(score),
        }
        for index, (mask, score) in enumerate(zip(masks, scores))
    ]


def _check_options(args: argparse.Namespace) -> None:
    checks = (
        (args.points_per_batch >= 1, "--points-per-batch must be at least 1"),
        (args.points_per_side >= 1, "--points-per-side must be at least 1"),
        (args.crops_n_layers >= 0, "--crops-n-layers must be 0 or more"),
        (0 <= args.pred_iou_thresh <= 1, "--pred-iou-thresh is a predicted IoU: use a value in [0, 1]"),
        (0 <= args.stability_score_thresh <= 1, "--stability-score-thresh must be in [0, 1]"),
    )
    for ok, message in checks:
        if not ok:
            raise CLIError(f"{message} (see `pasam generate --help`).")


def run_generate(args: argparse.Namespace) -> int:
    from transformers import pipeline

    from ..validation import to_rgb_uint8

    _check_options(args)
    paths = [Path(given).expanduser() for given in args.images]
    for path in paths:
        image_size(path)
    stems = output_stems(paths)
    device = resolve_device(args.device)
    out = prepare_output_dir(Path(args.out).expanduser())
    model, processor = load_model(args)
    generator = pipeline("mask-generation", model=model, image_processor=processor.image_processor, device=device)

    bar = progress(paths, "generate")
    for path, stem in zip(paths, stems):
        image = to_rgb_uint8(path, name=str(path))
        result = generator(
            PIL.Image.fromarray(image),
            points_per_batch=args.points_per_batch,
            points_per_crop=args.points_per_side,
            crops_n_layers=args.crops_n_layers,
            pred_iou_thresh=args.pred_iou_thresh,
            stability_score_thresh=args.stability_score_thresh,
        )
        written = write_generated(image, result, out, stem, path.name)
        count = len(result["masks"])
        hint = "" if count else " (lower --pred-iou-thresh / --stability-score-thresh to keep more)"
        bar.write(f"{path}: {count} mask{'s' * (count != 1)}{hint} -> {', '.join(map(str, written))}")
        bar.update(1)
    bar.close()
    return 0


def write_generated(image: np.ndarray, result: dict, out: Path, stem: str, file_name: str) -> list[Path]:
    """Save the colour overlay, the per-mask PNGs and the COCO JSON of one pipeline result; return what was written
    (the per-mask folder rather than each file)."""
    from ..visualization import color_overlay

    masks = [np.asarray(mask, dtype=bool) for mask in result["masks"]]
    scores = [float(score) for score in result["scores"]]
    order = np.argsort(scores, kind="stable")[::-1]
    masks, scores = [masks[i] for i in order], [scores[i] for i in order]

    overlay = save_png(color_overlay(masks, image=image) if masks else PIL.Image.fromarray(image),
                       out / f"{stem}_masks.png")
    folder = out / f"{stem}_masks"
    folder.mkdir(exist_ok=True)
    for stale in folder.glob("[0-9][0-9][0-9].png"):
        stale.unlink()  # masks of an earlier run with more masks would otherwise stay behind
    for index, mask in enumerate(masks):
        save_png(mask_image(mask), folder / f"{index:03d}.png")
    height, width = image.shape[:2]
    document = {
        "image": {"file_name": file_name, "height": height, "width": width},
        "annotations": coco_annotations(masks, scores),
    }
    json_path = out / f"{stem}_masks.json"
    try:
        json_path.write_text(json.dumps(document))
    except OSError as error:
        raise CLIError(f"cannot write {json_path} ({error}); check free space and permissions of --out.") from error
    return [overlay, folder, json_path]


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "generate",
        help="segment everything in an image (automatic mask generation)",
        description="Automatic masks with pipeline('mask-generation'): a grid of point prompts, filtered by "
                    "predicted IoU and stability. Writes a colour overlay, one PNG per mask and a COCO RLE JSON.",
        epilog="example: pasam generate photo.jpg --model ./pa-sam-vit-l --out everything/",
    )
    parser.add_argument("images", nargs="+", metavar="IMAGE", help="image files (PNG, JPEG, ...)")
    add_model_arguments(parser)
    parser.add_argument("--out", required=True, metavar="DIR", help="output directory (created if missing)")
    parser.add_argument("--points-per-side", type=int, default=32,
                        help="the point grid has this many points per side (default: 32)")
    parser.add_argument("--points-per-batch", type=int, default=64,
                        help="points decoded per forward pass; lower it if memory runs out (default: 64)")
    parser.add_argument("--pred-iou-thresh", type=float, default=0.88,
                        help="keep masks whose predicted IoU is at least this (default: 0.88)")
    parser.add_argument("--stability-score-thresh", type=float, default=0.95,
                        help="keep masks stable under threshold changes at least this much (default: 0.95)")
    parser.add_argument("--crops-n-layers", type=int, default=0,
                        help="also run on 4**i crops for i = 1..N, for small objects (default: 0)")
    parser.set_defaults(func=run_generate)


__all__ = ["register", "rle_decode", "rle_encode", "run_generate", "uncompressed_rle"]
