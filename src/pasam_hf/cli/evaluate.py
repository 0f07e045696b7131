"""`pasam evaluate`: box-prompted mIoU and boundary IoU of a model on a folder of images and masks or a dataset.

Prints the per-subset table (sub-folders of `--data` are subsets; "Average" is the mean of the subset means) and,
with `--out DIR`, writes `DIR/objects.csv` (one line per object) and `DIR/metrics.json` (summary and rows). The
protocol is in docs/evaluation.md; `--squash` is HQ-SAM's, the one PA-SAM's paper reports.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from . import CLIError

EPILOG = """examples:
  pasam evaluate --data HQSeg-44K/val --model ./pa-sam-vit-l --squash --out results/   # the paper's protocol
  pasam evaluate --data ./my_data --model ./runs/pasam --batch-size 8                  # images/ + masks/
  pasam evaluate --data me/my-dataset --split test --mask-column label --model ./pa-sam-vit-b
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    from .segment import add_model_arguments

    parser = subparsers.add_parser(
        "evaluate",
        help="score a model with tight box prompts: mIoU and boundary IoU per subset (HQSeg-44K protocol)",
        description=(
            "Prompt every ground-truth object with its tight box, predict PA-SAM's single mask and score it with "
            "mask IoU and boundary IoU (band 0.02 x diagonal) at the original size, void pixels ignored. DATA is "
            "a folder (images/ + masks/ or im/ + gt/, or sub-folders holding them: one subset each) or a datasets "
            "dataset (save_to_disk directory or Hub id)."
        ),
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--data", required=True, metavar="DIR_OR_DATASET", help="evaluation images and masks")
    parser.add_argument("--split", default="validation", help="split of a datasets dataset (default: validation)")
    parser.add_argument("--image-column", default="image", help="image column of a datasets dataset")
    parser.add_argument("--mask-column", default="mask", help="mask column of a datasets dataset")
    parser.add_argument("--void-value", type=int, default=255,
                        help="label-map value to ignore (default 255; -1: none)")
    parser.add_argument("--instance-mode", choices=("binary", "split"), default="binary",
                        help="binary: all object values are one object; split: one object per label value")
    parser.add_argument("--resize-masks", action="store_true",
                        help="resize masks whose size differs from their image's (nearest neighbour)")
    parser.add_argument("--subset", help="subset name for every image (default: each image's sub-folder)")
    add_model_arguments(parser)
    parser.add_argument("--squash", action="store_true",
                        help="HQ-SAM's protocol: resize images to 1024x1024 ignoring the aspect ratio and upsample "
                             "the 256x256 logits straight to the mask's size")
    parser.add_argument("--batch-size", type=int, default=4, help="images per forward pass (default: 4)")
    parser.add_argument("--dilation-ratio", type=float, default=0.02,
                        help="boundary band width as a fraction of the image diagonal (default: 0.02)")
    parser.add_argument("--out", metavar="DIR", help="write objects.csv and metrics.json here (created if missing)")
    parser.set_defaults(func=run_evaluate)


def _check_data(data: str) -> None:
    """A file is no data source (a missing path is told from a Hub id by `load_records`)."""
    path = Path(data).expanduser()
    if path.exists() and not path.is_dir():
        raise CLIError(f"--data {data} is a file; give a folder (images/ + masks/) or a datasets directory.")


def run_evaluate(args: argparse.Namespace) -> int:
    from ..data import load_records_from_flags
    from ..evaluation import evaluate_model
    from .segment import load_model, prepare_output_dir, resolve_device

    if args.batch_size < 1:
        raise CLIError(f"--batch-size is {args.batch_size}; use 1 or more.")
    if not 0 < args.dilation_ratio < 1:
        raise CLIError(f"--dilation-ratio is {args.dilation_ratio}; use a fraction of the diagonal, e.g. 0.02.")
    resolve_device(args.device)  # a bad --device is reported before anything is loaded
    _check_data(args.data)
    records = load_records_from_flags(args, args.data, split=args.split)
    out = prepare_output_dir(Path(args.out).expanduser()) if args.out else None
    model, processor = load_model(args)
    metrics = evaluate_model(
        model,
        processor,
        records,
        squash=args.squash,
        batch_size=args.batch_size,
        subset=args.subset,
        dilation_ratio=args.dilation_ratio,
        progress=sys.stderr.isatty(),
    )
    if not len(metrics):
        reasons = "; ".join(f"{sample['image']}: {sample['reason']}" for sample in metrics.skipped_samples[:3])
        more = f" and {len(metrics.skipped_samples) - 3} more" if len(metrics.skipped_samples) > 3 else ""
        raise CLIError(
            f"no object to score in --data {args.data}: {metrics.skipped} skipped ({reasons}{more}). Check "
            "--mask-column, --void-value and that masks mark objects with non-zero values."
        )
    print(metrics.summary_table())
    if out is not None:
        csv_path = metrics.to_csv(out / "objects.csv")
        json_path = metrics.to_json(out / "metrics.json")
        print(f"wrote {csv_path} and {json_path}")
    return 0


__all__ = ["register", "run_evaluate"]
