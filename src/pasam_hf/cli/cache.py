"""`pasam cache`: precompute image embeddings of augmented views, to train the decoder without the encoder."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "cache",
        help="precompute image embeddings of augmented views for fast decoder-only training",
        description=(
            "Encode --views augmented views of every training image once; then train with "
            "`pasam train --embedding-cache DIR --model <the same model>` (the encoder is frozen, so nothing is lost)."
        ),
    )
    parser.add_argument("--data", required=True, help="folder (images/ + masks/, im/ + gt/) or datasets id/dir")
    parser.add_argument("--model", required=True, help="the PA-SAM or SAM checkpoint you will fine-tune")
    parser.add_argument("--out", required=True, help="cache directory to create")
    parser.add_argument("--views", type=int, default=4,
                        help="augmented views per image (default 4); epoch e of training uses view e mod VIEWS")
    parser.add_argument("--no-augment", dest="augment", action="store_false")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--device", default="cuda" if _cuda() else "cpu")
    parser.add_argument("--dtype", default="float16", choices=("float16", "bfloat16", "float32"),
                        help="storage dtype of the embeddings")
    parser.add_argument("--split", default="train")
    parser.add_argument("--image-column", default="image")
    parser.add_argument("--mask-column", default="mask")
    parser.add_argument("--void-value", type=int, default=255)
    parser.add_argument("--instance-mode", choices=("binary", "split"), default="binary")
    parser.add_argument(
        "--label-interpolation", choices=("bilinear", "nearest"), default="bilinear",
        help="bilinear (release): soft labels; nearest: hard 0/1 labels (train with the same flag)",
    )
    parser.add_argument("--resize-masks", action="store_true",
                        help="resize masks whose size differs from their image's (nearest neighbour)")
    parser.add_argument("--max-bad-fraction", type=float, default=0.1,
                        help="stop when more than this fraction of the samples cannot be used (default 0.1, as "
                             "pasam train)")
    parser.set_defaults(func=run)


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def run(args: argparse.Namespace) -> int:
    import torch

    from ..data import DataQualityError, load_records_from_flags
    from ..loading import load_model_and_processor
    from ..training.cache import EmbeddingCacheDataset, build_embedding_cache
    from . import CLIError

    if not 0 <= args.max_bad_fraction <= 1:
        raise CLIError(f"--max-bad-fraction must be between 0 and 1 (got {args.max_bad_fraction}).")
    model, processor = load_model_and_processor(args.model, device=args.device)
    records = load_records_from_flags(args, args.data, split=args.split)
    try:
        path = build_embedding_cache(
            model,
            processor,
            records,
            args.out,
            views_per_image=args.views,
            augment=args.augment,
            seed=args.seed,
            batch_size=args.batch_size,
            dtype=getattr(torch, args.dtype),
            label_interpolation=args.label_interpolation,
            max_bad_fraction=args.max_bad_fraction,
        )
    except DataQualityError as error:
        raise CLIError(str(error)) from error
    cache = EmbeddingCacheDataset(path)
    if cache.bad_samples:
        print(f"skipped {len(cache.bad_samples)} of {cache.num_records} samples that could not be used (not cached):")
        for sample in cache.bad_samples:
            print(f"  {sample['name']}: {sample['reason']}")
    print(f"embedding cache written to {path}; train with: pasam train --embedding-cache {path} --model {args.model}")
    return 0
