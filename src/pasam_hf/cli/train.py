"""`pasam train`: fine-tune PA-SAM on a folder of images and masks or a `datasets` dataset.

Runs in one process as it is; `accelerate launch -m pasam_hf train ...` (or `accelerate launch
examples/finetune.py ...`) runs it on several GPUs or nodes with the settings of `accelerate config`.
"""

from __future__ import annotations

import argparse

from . import CLIError


def register(subparsers: argparse._SubParsersAction) -> None:
    from ..training.arguments import add_training_arguments

    parser = subparsers.add_parser(
        "train",
        help="fine-tune PA-SAM's adapter on your images and masks (Accelerate: 1 GPU, several GPUs or nodes)",
        description=(
            "Fine-tune PA-SAM with the release's recipe (Adam 1e-3, StepLR x0.1 / 10 epochs, pa-sam prompt mix). "
            "Example: pasam train --data ./my_data --model facebook/sam-vit-base --output-dir ./runs/pasam "
            "--max-steps 2000. Resume a stopped run with the same command plus --resume."
        ),
    )
    add_training_arguments(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..data import DataQualityError
    from ..training import (
        CheckpointError,
        EmbeddingCacheError,
        HubUploadError,
        TrainingDivergedError,
        arguments_from_namespace,
        train,
    )

    if args.model is None:
        # Also with --resume: a checkpoint holds only the trained parameters, the rest comes from --model.
        raise CLIError(
            "no model to fine-tune: pass --model with a PA-SAM or SAM checkpoint (Hub id or directory); with "
            "--resume, the one the run started from."
        )
    training_args = arguments_from_namespace(args)
    try:
        result = train(training_args)
    except (CheckpointError, EmbeddingCacheError, TrainingDivergedError, DataQualityError, HubUploadError) as error:
        raise CLIError(str(error)) from error
    if result.losses:
        print(f"final loss {result.losses[-1]:.4f} after {result.global_step} steps; model saved in {result.output_dir}")
    return 0
