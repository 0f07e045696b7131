"""`pasam segment`: masks for box and point prompts on your own images.

For every image it writes, into `--out`:

- `<stem>_mask.png` (or `<stem>_mask_<j>.png`, one per prompt when there are several): the binary mask at the
  image's size, 0 background and 255 foreground. It is the model's `pred_masks` brought to the image by
  `processor.post_process_masks` and thresholded at `--threshold` (mask logits, 0 = probability 0.5);
- `<stem>_overlay.png`: the masks' edges drawn on the image, with the prompts marked;
- with `--explain`, `<stem>_explain.png` (or `<stem>_explain_<j>.png`): coarse mask, refined mask, uncertainty map,
  final mask and mined points side by side.

The helpers here (image sizes, devices, output names) are shared with `pasam generate`.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import warnings
from dataclasses import dataclass, field
from itertools import groupby
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import PIL.Image
import torch
from tqdm.auto import tqdm

from . import CLIError

MODEL_INPUT_KEYS = ("pixel_values", "adapter_pixel_values", "input_points", "input_labels", "input_boxes")


# ------------------------------------------------------------------------------------------------ shared helpers
def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """`--model`, `--device`, `--dtype`: how every inference sub-command loads its model."""
    from ..loading import DTYPES

    parser.add_argument("--model", required=True, metavar="ID_OR_DIR",
                        help="PA-SAM checkpoint directory (save_pretrained / `pasam convert`) or Hub id; a SAM "
                             "checkpoint also works (with an untrained adapter)")
    parser.add_argument("--device", default="auto", help="torch device, e.g. cpu, cuda, cuda:1 (default: cuda if "
                                                          "available, else cpu)")
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES), help="model weights' dtype")


def resolve_device(name: str) -> torch.device:
    """`"auto"` -> cuda when available, else cpu; other names are checked so that a typo is a clear error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as error:
        raise CLIError(f"--device {name!r} is not a torch device ({error}); use cpu, cuda or cuda:N.") from error
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CLIError(f"--device {name} asks for CUDA, but torch sees no CUDA GPU here; use --device cpu.")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise CLIError(f"--device {name}: there are only {torch.cuda.device_count()} CUDA GPUs; pick another index.")
    return device


def image_size(path: Path) -> tuple[int, int]:
    """`(height, width)` of an image file as the processor will see it (EXIF orientation applied), read from the
    header so that every file is checked before the model runs."""
    if not path.is_file():
        raise CLIError(f"image {path} does not exist{' (it is a directory)' if path.is_dir() else ''}; check the path.")
    try:
        with PIL.Image.open(path) as image:
            width, height = image.size
            # EXIF orientations 5-8 rotate by 90 degrees: the upright image has width and height swapped.
            if image.getexif().get(0x0112, 1) in (5, 6, 7, 8):
                width, height = height, width
    except (OSError, SyntaxError, ValueError, PIL.Image.DecompressionBombError) as error:
        raise CLIError(
            f"image {path} cannot be read ({' '.join(str(error).split())}); it is not an image or is corrupt: "
            "re-export it as PNG or JPEG."
        ) from error
    return height, width


def output_stems(paths: list[Path]) -> list[str]:
    """File-name stems for the outputs of each image; two images with the same stem would overwrite each other."""
    stems = [path.stem for path in paths]
    seen: dict[str, Path] = {}
    for stem, path in zip(stems, paths):
        if stem in seen and seen[stem].resolve() != path.resolve():
            raise CLIError(
                f"images {seen[stem]} and {path} would write outputs with the same name ({stem}_...); rename one, "
                "or run them with different --out directories."
            )
        seen[stem] = path
    return stems


def prepare_output_dir(out: Path) -> Path:
    if out.exists() and not out.is_dir():
        raise CLIError(f"--out {out} is a file; give a directory (it is created if missing).")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise CLIError(f"cannot create --out directory {out} ({error.strerror}); choose a writable path.") from error
    return out


def save_png(image: PIL.Image.Image, path: Path) -> Path:
    try:
        image.save(path)
    except OSError as error:
        raise CLIError(f"cannot write {path} ({error}); check free space and permissions of --out.") from error
    return path


def mask_image(mask: np.ndarray) -> PIL.Image.Image:
    """A boolean `(H, W)` mask as an 8-bit PNG-ready image: 0 background, 255 foreground."""
    return PIL.Image.fromarray(mask.astype(np.uint8) * 255, mode="L")


def to_model_inputs(inputs: dict, device: torch.device, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The processor's tensors the model takes, on `device`; pixel inputs in the model's dtype."""
    moved = {}
    for key in MODEL_INPUT_KEYS:
        if key in inputs and inputs[key] is not None:
            value = inputs[key].to(device)
            moved[key] = value.to(dtype) if key.endswith("pixel_values") else value
    return moved


def load_model(args: argparse.Namespace):
    """`(model, processor)` for `--model/--device/--dtype`, without transformers' weight-loading progress bar (the
    command line shows its own progress)."""
    from transformers.utils import logging as transformers_logging

    from ..loading import load_model_and_processor

    transformers_logging.disable_progress_bar()
    return load_model_and_processor(args.model, device=resolve_device(args.device), dtype=args.dtype)


def progress(items: list, description: str) -> tqdm:
    """A progress bar on stderr for more than one item; tqdm hides it when stderr is not a terminal."""
    return tqdm(items, desc=description, unit="image", disable=None if len(items) > 1 else True)


# --------------------------------------------------------------------------------------------------- prompts
@dataclass
class Job:
    """One image and its prompts (image pixels); `points` form one prompt, combined with at most one box."""

    path: Path
    stem: str
    size: tuple[int, int]
    boxes: list[list[float]] = field(default_factory=list)
    points: list[list[float]] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)

    @property
    def num_prompts(self) -> int:
        return max(len(self.boxes), 1 if self.points else 0)

    def batch_key(self) -> tuple[int, bool, int]:
        # Images are batched only with images whose prompts have the same structure (the processor pads nothing).
        return (len(self.boxes), bool(self.points), len(self.points))

    def processor_prompts(self) -> dict[str, Any]:
        prompts: dict[str, Any] = {}
        if self.boxes:
            prompts["input_boxes"] = self.boxes
        if self.points:
            prompts["input_points"] = [self.points]
            prompts["input_labels"] = [self.labels]
        return prompts


def read_boxes_file(path: Path) -> dict[str, list[list[float]]]:
    """`{"image name": [[x0, y0, x1, y1], ...]}`, checked for shape; names match a path as given, its file name or
    its stem."""
    example = '{"photo.jpg": [[10, 20, 200, 240]], "other.png": [[0, 0, 50, 50], [60, 60, 90, 120]]}'
    if not path.is_file():
        raise CLIError(f"--boxes-file {path} does not exist; give a JSON file like {example}.")
    try:
        content = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise CLIError(f"--boxes-file {path} is not valid JSON ({error}); write it like {example}.") from error
    if not isinstance(content, dict):
        raise CLIError(f"--boxes-file {path} holds a {type(content).__name__}; it must map image names to box "
                       f"lists, e.g. {example}.")
    for name, boxes in content.items():
        valid = isinstance(boxes, list) and all(
            isinstance(box, list) and len(box) == 4
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in box)
            for box in boxes
        )
        if not valid:
            raise CLIError(f"--boxes-file {path}: the entry for {name!r} is {json.dumps(boxes)[:80]}; each image maps "
                           f"to a list of [x0, y0, x1, y1] boxes, e.g. {example}.")
    return {name: [[float(v) for v in box] for box in boxes] for name, boxes in content.items()}


def _file_boxes(boxes_file: dict[str, list[list[float]]], path: Path, given: str) -> list[list[float]]:
    for key in (given, str(path), path.name, path.stem):
        if key in boxes_file:
            return boxes_file[key]
    return []


def _readable(message: str) -> str:
    """Name prompts as the command line does, not as the processor's `input_boxes[0][j]`."""
    message = re.sub(r"input_boxes\[0\]\[(\d+)\]", lambda found: f"box {int(found[1]) + 1}", message)
    return re.sub(r"input_points\[0\]\[0\]", "the points", message)


def check_prompts(job: Job) -> list[str]:
    """Check a job's prompts against its image size; return warnings (boxes clipped), raise CLIError otherwise."""
    from ..validation import validate_prompts

    prompts = job.processor_prompts()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            validate_prompts(
                [job.size],
                input_points=[prompts["input_points"]] if "input_points" in prompts else None,
                input_labels=[prompts["input_labels"]] if "input_labels" in prompts else None,
                input_boxes=[prompts["input_boxes"]] if "input_boxes" in prompts else None,
            )
    except ValueError as error:
        raise CLIError(f"{job.path}: {_readable(' '.join(str(error).split()))}") from error
    return [f"{job.path}: {_readable(' '.join(str(w.message).split()))}" for w in caught]


def build_jobs(args: argparse.Namespace) -> list[Job]:
    paths = [Path(given).expanduser() for given in args.images]
    sizes = [image_size(path) for path in paths]
    stems = output_stems(paths)
    boxes_file = read_boxes_file(Path(args.boxes_file).expanduser()) if args.boxes_file else {}
    points = [list(p) for p in args.point or []] + [list(p) for p in args.negative_point or []]
    labels = [1] * len(args.point or []) + [0] * len(args.negative_point or [])
    jobs = []
    for given, path, size, stem in zip(args.images, paths, sizes, stems):
        boxes = [list(box) for box in args.box or []] + _file_boxes(boxes_file, path, given)
        if not boxes and not points:
            raise CLIError(
                f"no prompt for {path}: give --box X0 Y0 X1 Y1, --point X Y (and --negative-point X Y), or an entry "
                f"for {path.name!r} in --boxes-file."
            )
        if points and len(boxes) > 1:
            raise CLIError(
                f"{path} has {len(boxes)} boxes and --point/--negative-point: points refine one object, so combine "
                "them with at most one box (segment the other boxes in a separate run)."
            )
        jobs.append(Job(path=path, stem=stem, size=size, boxes=boxes, points=points, labels=labels))
    return jobs


def batches(jobs: list[Job], batch_size: int) -> Iterator[list[Job]]:
    """Jobs in batches of at most `batch_size`, each batch of one prompt structure."""
    ordered = sorted(jobs, key=Job.batch_key)
    for _, group in groupby(ordered, key=Job.batch_key):
        group = list(group)
        for start in range(0, len(group), batch_size):
            yield group[start : start + batch_size]


# --------------------------------------------------------------------------------------------------- running
def _write_outputs(
    job: Job, image: np.ndarray, index: int, outputs, inputs, processor, args: argparse.Namespace, out: Path
) -> list[Path]:
    """Write the mask(s), overlay and explain panels of image `index` of a batch; return the paths written."""
    from ..visualization import explain_panel, input_frame_to_image_points, overlay_masks

    original = inputs["original_sizes"][index : index + 1]
    reshaped = inputs["reshaped_input_sizes"][index : index + 1]

    def to_image(maps: torch.Tensor, binarize: bool) -> torch.Tensor:
        # (P, 1, h, w) in the input frame -> (P, H, W) in the image frame.
        frame = processor.post_process_masks(
            [maps[index].float().cpu()], original, reshaped, mask_threshold=args.threshold, binarize=binarize
        )[0]
        return frame[:, 0]

    masks = to_image(outputs.pred_masks, binarize=True).numpy()
    several = len(masks) > 1
    written = []
    for prompt, mask in enumerate(masks):
        suffix = f"_{prompt}" if several else ""
        written.append(save_png(mask_image(mask), out / f"{job.stem}_mask{suffix}.png"))
    overlay = overlay_masks(
        image, masks, boxes=job.boxes or None, points=job.points or None, point_labels=job.labels or None
    )
    written.append(save_png(overlay, out / f"{job.stem}_overlay.png"))
    if args.explain:
        coarse = to_image(outputs.coarse_masks, binarize=False)
        refined = to_image(outputs.refined_masks, binarize=False)
        uncertainty = to_image(outputs.uncertainty_maps, binarize=False)
        for prompt in range(len(masks)):
            mined = labels = None
            if outputs.mined_point_coords is not None:
                mined = input_frame_to_image_points(outputs.mined_point_coords[index, prompt], original[0], reshaped[0])
                labels = outputs.mined_point_labels[index, prompt]
            panel = explain_panel(image, coarse[prompt], refined[prompt], uncertainty[prompt], masks[prompt],
                                  mined_points=mined, mined_labels=labels)
            suffix = f"_{prompt}" if several else ""
            written.append(save_png(panel, out / f"{job.stem}_explain{suffix}.png"))
    return written


def run_segment(args: argparse.Namespace) -> int:
    from ..validation import PromptClippedWarning, to_rgb_uint8

    if args.batch_size < 1:
        raise CLIError(f"--batch-size is {args.batch_size}; use 1 or more.")
    jobs = build_jobs(args)
    notes = [note for job in jobs for note in check_prompts(job)]
    device = resolve_device(args.device)
    out = prepare_output_dir(Path(args.out).expanduser())
    model, processor = load_model(args)
    for note in notes:
        print(f"pasam segment: warning: {note}", file=sys.stderr)

    total_masks = 0
    bar = progress(jobs, "segment")
    for batch in batches(jobs, args.batch_size):
        images = [to_rgb_uint8(job.path, name=str(job.path)) for job in batch]
        prompts = [job.processor_prompts() for job in batch]
        with warnings.catch_warnings():
            # Clipped boxes were reported once above, with the image's name.
            warnings.simplefilter("ignore", PromptClippedWarning)
            inputs = processor(
                images=images,
                **{key: [p[key] for p in prompts] for key in prompts[0]},
                return_tensors="pt",
            )
        with torch.inference_mode():
            outputs = model(**to_model_inputs(inputs, device, model.dtype), multimask_output=False)
        for index, job in enumerate(batch):
            written = _write_outputs(job, images[index], index, outputs, inputs, processor, args, out)
            total_masks += job.num_prompts
            bar.write(f"{job.path} -> {', '.join(str(path) for path in written)}")
            bar.update(1)
    bar.close()
    print(f"wrote {total_masks} mask{'s' * (total_masks != 1)} for {len(jobs)} image{'s' * (len(jobs) != 1)} "
          f"to {out}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "segment",
        help="segment objects in images from box or point prompts",
        description="Segment objects from box or point prompts. Writes the binary mask PNG(s) at the image's size, "
                    "an overlay PNG and, with --explain, PA-SAM's internals side by side. Prompts given with --box "
                    "and --point apply to every image; --boxes-file gives boxes per image.",
        epilog="example: pasam segment photo.jpg --box 40 30 380 290 --model ./pa-sam-vit-l --out masks/",
    )
    parser.add_argument("images", nargs="+", metavar="IMAGE", help="image files (PNG, JPEG, ...)")
    parser.add_argument("--box", nargs=4, type=float, action="append", metavar=("X0", "Y0", "X1", "Y1"),
                        help="box prompt in pixels (repeat for several objects: one mask per box)")
    parser.add_argument("--point", nargs=2, type=float, action="append", metavar=("X", "Y"),
                        help="foreground point in pixels (repeat: all points describe one object)")
    parser.add_argument("--negative-point", nargs=2, type=float, action="append", metavar=("X", "Y"),
                        help="background point in pixels (repeatable)")
    parser.add_argument("--boxes-file", metavar="JSON",
                        help='boxes per image: {"photo.jpg": [[x0, y0, x1, y1], ...], ...} (keys: path, file name '
                             "or stem)")
    add_model_arguments(parser)
    parser.add_argument("--out", required=True, metavar="DIR", help="output directory (created if missing)")
    parser.add_argument("--explain", action="store_true",
                        help="also write coarse/refined/uncertainty/final masks and mined points side by side")
    parser.add_argument("--batch-size", type=int, default=4, help="images per forward pass (default: 4)")
    parser.add_argument("--threshold", type=float, default=0.0,
                        help="mask logit threshold (default 0.0, i.e. probability 0.5)")
    parser.set_defaults(func=run_segment)


__all__ = ["register", "run_segment"]
