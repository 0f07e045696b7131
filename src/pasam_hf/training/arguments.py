"""Settings of a PA-SAM fine-tuning run, shared by `pasam train` and `examples/finetune.py`.

Defaults are the release's recipe (reference section 6): Adam at 1e-3, the learning rate x0.1 every 10 epochs,
21 epochs, batch 4 per process, fp32, the `pa-sam` prompt mix, point mining from epoch 5.
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass
from pathlib import Path


@dataclass
class TrainingArguments:
    """Everything a fine-tuning run needs; see `pasam train --help` for each field's meaning."""

    output_dir: str
    model: str | None = None
    data: str | None = None
    eval_data: str | None = None
    # Data source options (see pasam_hf.data.load_records).
    split: str = "train"
    eval_split: str = "validation"
    image_column: str = "image"
    mask_column: str = "mask"
    void_value: int = 255
    instance_mode: str = "binary"
    resize_masks: bool = False
    streaming: bool = False
    steps_per_epoch: int | None = None
    embedding_cache: str | None = None
    # Optimisation.
    num_epochs: int = 21
    max_steps: int | None = None
    batch_size: int = 4
    gradient_accumulation_steps: int = 1
    learning_rate: float = 1e-3
    weight_decay: float = 0.0
    lr_decay_epochs: int = 10
    lr_decay_gamma: float = 0.1
    max_grad_norm: float | None = None
    mixed_precision: str = "no"
    seed: int = 42
    num_workers: int = 0
    # Prompts and the adapter.
    prompt_preset: str = "pa-sam"
    num_points: int = 10
    num_negative_points: int = 0
    max_instances_per_image: int = 4
    augment: bool = True
    # The release's data conventions (reference section 6); see docs/architecture.md for the clean variants.
    label_interpolation: str = "bilinear"
    mask_prompt_values: tuple[float, float] = (0.0, 255.0)
    point_mining_warmup_epochs: int = 5
    # Checkpoints, resume, logging.
    checkpoint_every: int = 500
    keep_checkpoints: int = 2
    resume: str | None = None
    log_every: int = 10
    report_to: str = "tensorboard"
    max_bad_fraction: float = 0.1
    max_nonfinite_steps: int = 5
    push_to_hub: str | None = None
    hub_private: bool = False
    hub_revision: str | None = None
    progress: bool = True

    def __post_init__(self) -> None:
        problems = []
        if self.batch_size < 1:
            problems.append(f"--batch-size must be >= 1 (got {self.batch_size})")
        if self.gradient_accumulation_steps < 1:
            problems.append(f"--gradient-accumulation-steps must be >= 1 (got {self.gradient_accumulation_steps})")
        if self.max_steps is not None and self.max_steps < 1:
            problems.append(f"--max-steps must be >= 1 (got {self.max_steps})")
        if self.num_epochs < 1:
            problems.append(f"--num-epochs must be >= 1 (got {self.num_epochs})")
        if self.learning_rate <= 0:
            problems.append(f"--learning-rate must be > 0 (got {self.learning_rate})")
        if self.checkpoint_every < 1:
            problems.append(f"--checkpoint-every must be >= 1 optimizer step (got {self.checkpoint_every})")
        if self.keep_checkpoints < 1:
            problems.append(f"--keep-checkpoints must be >= 1 (got {self.keep_checkpoints})")
        if not 0 <= self.max_bad_fraction <= 1:
            problems.append(f"--max-bad-fraction must be between 0 and 1 (got {self.max_bad_fraction})")
        if self.max_nonfinite_steps < 1:
            problems.append(f"--max-nonfinite-steps must be >= 1 (got {self.max_nonfinite_steps})")
        if self.mixed_precision not in ("no", "bf16", "fp16"):
            problems.append(f"--mixed-precision must be no, bf16 or fp16 (got {self.mixed_precision!r})")
        if self.prompt_preset not in ("pa-sam", "hq-sam"):
            problems.append(f"--prompt-preset must be pa-sam or hq-sam (got {self.prompt_preset!r})")
        if self.label_interpolation not in ("bilinear", "nearest"):
            problems.append(f"--label-interpolation must be bilinear or nearest (got {self.label_interpolation!r})")
        self.mask_prompt_values = tuple(float(value) for value in self.mask_prompt_values)
        if len(self.mask_prompt_values) != 2:
            problems.append(f"--mask-prompt-values takes two numbers, LOW HIGH (got {self.mask_prompt_values})")
        if self.data is None and self.embedding_cache is None:
            problems.append("no training data: pass --data DIR_OR_DATASET (or --embedding-cache DIR)")
        if self.embedding_cache is not None:
            # What the data gives was fixed when the cache was built: these would be silently ignored.
            if self.data is not None:
                problems.append(
                    "--data and --embedding-cache both give the training data: pass one (the cache holds the views "
                    "of the data it was built from)"
                )
            if not self.augment:
                problems.append(
                    "--no-augment has no effect with --embedding-cache (its views were augmented or not when it was "
                    "built): build the cache with `pasam cache --no-augment`, and drop --no-augment here"
                )
            if self.instance_mode != "binary":
                problems.append(
                    f"--instance-mode {self.instance_mode} has no effect with --embedding-cache (the masks were read "
                    "when it was built): build the cache with `pasam cache --instance-mode ...`, and drop it here"
                )
            if self.streaming:
                problems.append("--streaming has no effect with --embedding-cache (a cache is read from disk): drop it")
            if self.resize_masks:
                problems.append(
                    "--resize-masks has no effect with --embedding-cache (the masks were read when it was built): "
                    "build the cache with `pasam cache --resize-masks`, and drop it here"
                )
        if self.streaming and self.steps_per_epoch is None and self.max_steps is None:
            problems.append(
                "a streamed dataset has no length: pass --steps-per-epoch (for the learning-rate schedule and "
                "point-mining warm-up) or --max-steps"
            )
        if problems:
            raise ValueError("; ".join(problems) + ".")

    @property
    def checkpoint_dir(self) -> Path:
        return Path(self.output_dir) / "checkpoints"


def add_training_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add every [`TrainingArguments`] field to `parser` as a `--flag` (used by `pasam train` and the example)."""
    defaults = TrainingArguments.__dataclass_fields__

    def default(name: str):
        return defaults[name].default

    data = parser.add_argument_group("data")
    data.add_argument("--data", help="training data: a folder (images/ + masks/, or im/ + gt/) or a datasets id/dir")
    data.add_argument("--eval-data", help="evaluation data, same forms as --data; evaluated after each epoch")
    data.add_argument("--split", default=default("split"), help="split of a datasets dataset (default: train)")
    data.add_argument("--eval-split", default=default("eval_split"))
    data.add_argument("--image-column", default=default("image_column"))
    data.add_argument("--mask-column", default=default("mask_column"))
    data.add_argument("--void-value", type=int, default=default("void_value"), help="mask value to ignore")
    data.add_argument("--resize-masks", action="store_true",
                      help="resize masks whose size differs from their image's (nearest neighbour)")
    data.add_argument(
        "--instance-mode", choices=("binary", "split"), default=default("instance_mode"),
        help="binary: all non-zero mask values are one object; split: each value is an instance",
    )
    data.add_argument(
        "--streaming", action="store_true",
        help="stream a datasets dataset larger than memory (not a folder: it is read file by file anyway)",
    )
    data.add_argument(
        "--steps-per-epoch", type=int,
        help="streamed data only: an epoch is this many optimizer steps (evaluation, point-mining warm-up and "
        "learning-rate decay follow it); the stream is read on across epochs and again from its start when it ends",
    )
    data.add_argument(
        "--embedding-cache",
        help="train from image embeddings precomputed by `pasam cache` instead of --data; an epoch is one pass over "
        "the images, epoch e using view e mod VIEWS of each",
    )
    data.add_argument("--no-augment", dest="augment", action="store_false", help="no flip / large-scale jitter")
    data.add_argument(
        "--label-interpolation", choices=("bilinear", "nearest"), default=default("label_interpolation"),
        help="bilinear (release): masks resized to soft labels, fractional at edges; nearest: hard 0/1 labels",
    )
    data.add_argument("--num-workers", type=int, default=default("num_workers"), help="DataLoader workers")

    optim = parser.add_argument_group("optimisation (release defaults)")
    optim.add_argument("--model", help="PA-SAM or SAM checkpoint: Hub id or directory (SAM gets a fresh adapter)")
    optim.add_argument("--num-epochs", type=int, default=default("num_epochs"))
    optim.add_argument(
        "--max-steps", type=int,
        help="stop after this many optimizer steps, however many epochs that takes (overrides --num-epochs; the "
        "learning-rate decay and point-mining warm-up still count epochs)",
    )
    optim.add_argument("--batch-size", type=int, default=default("batch_size"), help="images per process and step")
    optim.add_argument("--gradient-accumulation-steps", type=int, default=default("gradient_accumulation_steps"))
    optim.add_argument("--learning-rate", type=float, default=default("learning_rate"))
    optim.add_argument("--weight-decay", type=float, default=default("weight_decay"))
    optim.add_argument("--lr-decay-epochs", type=int, default=default("lr_decay_epochs"))
    optim.add_argument("--lr-decay-gamma", type=float, default=default("lr_decay_gamma"))
    optim.add_argument("--max-grad-norm", type=float, help="clip gradients to this norm (off by default)")
    optim.add_argument("--mixed-precision", choices=("no", "bf16", "fp16"), default=default("mixed_precision"))
    optim.add_argument("--seed", type=int, default=default("seed"))

    prompts = parser.add_argument_group("prompts and adapter")
    prompts.add_argument("--prompt-preset", choices=("pa-sam", "hq-sam"), default=default("prompt_preset"))
    prompts.add_argument("--num-points", type=int, default=default("num_points"))
    prompts.add_argument("--num-negative-points", type=int, default=default("num_negative_points"))
    prompts.add_argument("--max-instances-per-image", type=int, default=default("max_instances_per_image"))
    prompts.add_argument(
        "--mask-prompt-values", type=float, nargs=2, metavar=("LOW", "HIGH"), default=default("mask_prompt_values"),
        help="values of noisy-mask prompts outside/inside the mask (release: 0 255; e.g. -20 20 for logit-like)",
    )
    prompts.add_argument(
        "--point-mining-warmup-epochs", type=int, default=default("point_mining_warmup_epochs"),
        help="epochs before hard point mining is switched on (release: 5)",
    )

    run = parser.add_argument_group("checkpoints, logging, Hub")
    run.add_argument("--output-dir", required=True, help="where checkpoints, logs and the final model go")
    run.add_argument("--checkpoint-every", type=int, default=default("checkpoint_every"), help="optimizer steps")
    run.add_argument("--keep-checkpoints", type=int, default=default("keep_checkpoints"))
    run.add_argument(
        "--resume", nargs="?", const="latest",
        help="resume from the latest checkpoint in --output-dir (or from the given checkpoint directory)",
    )
    run.add_argument("--log-every", type=int, default=default("log_every"))
    run.add_argument("--report-to", default=default("report_to"), help="Accelerate tracker(s): tensorboard, all, none")
    run.add_argument("--max-bad-fraction", type=float, default=default("max_bad_fraction"))
    run.add_argument("--max-nonfinite-steps", type=int, default=default("max_nonfinite_steps"))
    run.add_argument("--push-to-hub", metavar="REPO_ID", help="upload the final model to this Hub repository")
    run.add_argument("--hub-private", action="store_true")
    run.add_argument("--hub-revision")
    run.add_argument("--no-progress", dest="progress", action="store_false")
    return parser


def arguments_from_namespace(namespace: argparse.Namespace) -> TrainingArguments:
    """Build [`TrainingArguments`] from parsed flags, ignoring the parser's other attributes."""
    names = {f.name for f in dataclasses.fields(TrainingArguments)}
    return TrainingArguments(**{key: value for key, value in vars(namespace).items() if key in names})
