"""The PA-SAM fine-tuning loop, written to be read top to bottom (in the spirit of transformers'
`examples/pytorch/*_no_trainer.py`): Accelerate for devices, processes and mixed precision; the release's recipe for
what is trained and how (reference sections 5-6); atomic checkpoints with exact resume; bad samples and non-finite
losses reported instead of crashing the run.

Entry points: [`train`] (Python), `pasam train` (CLI) and `accelerate launch examples/finetune.py` (script).
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import math
import os
import signal
import sys
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import (
    DataLoaderConfiguration,
    DistributedType,
    GradientAccumulationPlugin,
    ProjectConfiguration,
    gather_object,
    set_seed,
)
from torch.utils.data import DataLoader, IterableDataset
from tqdm.auto import tqdm

from ..adapters import save_adapter, trainable_parameter_names
from ..data import (
    BadSampleTracker,
    DataQualityError,
    PASamDataCollator,
    PASamIterableTrainingDataset,
    PASamTrainingDataset,
    PromptSimulator,
    load_records_from_flags,
    sample_report,
)
from ..loading import load_model_and_processor
from ..modeling_pasam import PASamModel
from ..processing_pasam import PASamProcessor
from .arguments import TrainingArguments
from .checkpointing import CheckpointManager, TrainerState

logger = logging.getLogger(__name__)

# What `--push-to-hub` leaves out of the upload of the output directory.
HUB_IGNORE_PATTERNS = ("checkpoints/*", "logs/*")
# Model inputs a training batch may carry; everything else in a batch (names, skipped samples) is bookkeeping.
MODEL_INPUTS = ("adapter_pixel_values", "input_boxes", "input_points", "input_labels", "input_masks", "labels")


class TrainingDivergedError(RuntimeError):
    """The loss stayed non-finite for too many consecutive steps; the last good checkpoint is kept as it was."""


class HubUploadError(RuntimeError):
    """The trained model was saved locally but could not be uploaded to the Hub."""


@dataclass
class TrainingResult:
    """What a finished run reports: steps done, loss history (one value per optimizer step) and data problems."""

    global_step: int
    epochs_completed: int
    losses: list[float] = field(default_factory=list)
    nonfinite_steps: int = 0
    # Every sample skipped during the run (all processes), once each: `{"name", "kind", "reason"}`.
    bad_samples: list[dict[str, str]] = field(default_factory=list)
    output_dir: str = ""
    last_checkpoint: str | None = None


def mark_trainable(model: PASamModel) -> list[str]:
    """Freeze everything but the release's trained set (adapter, guiding branch, upscaling, hypernetwork MLPs,
    mask tokens); returns the names of the parameters that get gradients.

    The loss sees only the first mask (single-mask training, as released), so the hypernetwork MLPs of the three
    other masks never get a gradient: they stay frozen too, which keeps DDP from waiting for their gradients
    (the release's optimizer never moved them either).
    """
    num_outputs = model.config.mask_decoder_config.num_multimask_outputs
    unused = tuple(f"mask_decoder.output_hypernetworks_mlps.{index}." for index in range(1, num_outputs + 1))
    names = {name for name in trainable_parameter_names(model) if not name.startswith(unused)}
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(name in names)
    return sorted(names)


def batch_seed(seed: int, epoch: int, batch_index: int, process_index: int) -> int:
    """Seed of one batch's random prompts: a function of where the batch is, so a resumed run draws the same."""
    return (seed * 1_000_003 + epoch * 10_007 + batch_index * 101 + process_index) % (2**63 - 1)


def _trackers_config(args: TrainingArguments) -> dict[str, Any]:
    # TensorBoard's hparams take only scalars and strings.
    return {k: v for k, v in dataclasses.asdict(args).items() if isinstance(v, (int, float, str, bool))}


def _build_dataset(args: TrainingArguments, model: PASamModel, processor: PASamProcessor, records: Iterable | None):
    if args.embedding_cache is not None:
        from .cache import EmbeddingCacheDataset

        return EmbeddingCacheDataset(args.embedding_cache, model=model, label_interpolation=args.label_interpolation)
    if records is None:
        records = load_records_from_flags(args, args.data, split=args.split, streaming=args.streaming)
    options = dict(augment=args.augment, seed=args.seed, label_interpolation=args.label_interpolation)
    if isinstance(records, Sequence):
        return PASamTrainingDataset(records, processor, **options)
    # A stream (IterableRecords, a generator): read it as it comes instead of materialising it.
    return PASamIterableTrainingDataset(records, processor, **options)


# Config fields that say where a model came from or that the loop itself switches, not what the model is.
_VOLATILE_CONFIG_KEYS = frozenset({
    "_name_or_path", "name_or_path", "_commit_hash", "transformers_version", "architectures", "auto_map", "dtype",
    "torch_dtype", "point_mining_in_training",
})


def _run_identity(
    args: TrainingArguments, model: PASamModel, trainable_names: list[str], dataset, accelerator: Accelerator
) -> dict[str, Any]:
    """What a checkpoint must have been saved by to be resumed here (compared by `CheckpointManager.load`): the
    model (configuration, and a fingerprint of every frozen weight, per module), the training data, and the settings
    that the saved position, optimizer and schedule depend on."""

    def config_dict(config: dict) -> dict:
        return {
            key: config_dict(value) if isinstance(value, dict) else value
            for key, value in config.items()
            if key not in _VOLATILE_CONFIG_KEYS
        }

    trained = set(trainable_names)
    digests: dict[str, Any] = {}
    for name, tensor in model.state_dict().items():
        if name in trained:
            continue  # restored from the checkpoint
        digest = digests.setdefault(name.split(".", 1)[0], hashlib.sha256())
        values = tensor.detach().reshape(-1)
        # Exact bytes of a strided sample of every tensor: any other checkpoint differs there, on any device.
        values = values[:: max(1, values.numel() // 4096)]
        digest.update(f"{name}{tuple(tensor.shape)}".encode())
        digest.update(values.float().cpu().numpy().tobytes())
    return {
        "model_config": config_dict(model.config.to_dict()),
        "model_weights": {module: digest.hexdigest()[:16] for module, digest in sorted(digests.items())},
        **_data_identity(args, dataset),
        "batch_size": args.batch_size,
        "gradient_accumulation_steps": args.gradient_accumulation_steps,
        "num_processes": accelerator.num_processes,
        "seed": args.seed,
        "steps_per_epoch": args.steps_per_epoch,
        "learning_rate": args.learning_rate,
        "weight_decay": args.weight_decay,
        "lr_decay_epochs": args.lr_decay_epochs,
        "lr_decay_gamma": args.lr_decay_gamma,
    }


def _data_identity(args: TrainingArguments, dataset) -> dict[str, str]:
    """`{"data", "data_description"}`: a fingerprint of the training data, from the sample names (and a `datasets`
    fingerprint), so a moved folder is the same data, or for a stream, which cannot be listed, its source and split;
    and how to tell it in a message."""
    from ..data.sources import RecordSequence
    from .cache import EmbeddingCacheDataset

    digest = hashlib.sha256()
    if isinstance(dataset, EmbeddingCacheDataset):
        names = [entry["name"] for entry in dataset.entries]
        digest.update(str(dataset.index.get("encoder_fingerprint")).encode())
        description = f"the embedding cache {args.embedding_cache} ({len(dataset)} images)"
    elif isinstance(getattr(dataset, "records", None), RecordSequence):
        records = dataset.records
        names = [records.sample_name(index) for index in range(len(records))]
        digest.update(str(getattr(getattr(records, "dataset", None), "_fingerprint", "")).encode())
        description = f"{len(records)} samples of {args.data}"
        if not Path(str(args.data)).exists():
            description += f" (split {args.split})"
    else:
        source = Path(str(args.data))
        names = [str(source.resolve()) if source.exists() else str(args.data), args.split]
        description = f"the stream {args.data} (split {args.split})"
    digest.update("\n".join(names).encode())
    return {"data": digest.hexdigest()[:16], "data_description": description}


def _keep_items(items: list) -> list:
    # The DataLoader only batches items; prompts are drawn in the main process (see batch_seed).
    return items


def _ignore_interrupts(worker_id: int) -> None:
    # Ctrl-C (and a scheduler's SIGTERM to the job) reaches DataLoader workers too (same process group); the main
    # process decides when to stop, so a worker must not die of it before the step in progress has finished (see
    # _StopRequest). The DataLoader still shuts its workers down when the main process ends.
    for signum in _StopRequest.signals:
        signal.signal(signum, signal.SIG_IGN)


class _StopRequest:
    """Ctrl-C (SIGINT) or SIGTERM (`kill`, a scheduler pre-empting the job, `docker stop`) during training: finish
    the optimizer step in progress, save a checkpoint, then stop.

    A `KeyboardInterrupt` raised wherever the main thread happens to be (inside the forward, between the optimizer's
    updates of two tensors, after a batch was counted but before its step) would leave no consistent state to save.
    The handler only records the request; the loop checks it between optimizer steps, where weights, optimizer,
    schedule, RNG and the position in the epoch all describe the same completed step, and every process agrees on
    the stop (one all-reduce per step). A second Ctrl-C stops at once, without saving; one that comes within
    `duplicate_seconds` of the first is the same Ctrl-C delivered twice (a launcher such as `accelerate launch`
    forwards the terminal's SIGINT to processes that received it already) and is ignored.
    """

    duplicate_seconds = 2.0
    signals = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, accelerator: Accelerator):
        self.accelerator = accelerator
        self.requested = False
        self._requested_at = 0.0
        self._previous: dict[int, object] = {}

    def __enter__(self) -> _StopRequest:
        # Python delivers signals to the main thread only; train() in another thread keeps the default.
        if threading.current_thread() is threading.main_thread():
            self._previous = {signum: signal.signal(signum, self._handle) for signum in self.signals}
        return self

    def __exit__(self, *exc_info) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        self._previous = {}

    def _handle(self, signum, frame) -> None:
        if self.requested:
            if time.monotonic() - self._requested_at < self.duplicate_seconds:
                return
            self.__exit__()
            raise KeyboardInterrupt
        self.requested = True
        self._requested_at = time.monotonic()
        name = signal.Signals(signum).name.encode()
        os.write(2, b"\n" + name + b": stopping after the current step and saving a checkpoint (Ctrl-C again to "
                    b"stop at once, without saving)\n")

    def agreed(self) -> bool:
        """Whether any process was asked to stop; call on every process at the same point."""
        if self.accelerator.num_processes == 1:
            return self.requested
        flag = torch.tensor([int(self.requested)], device=self.accelerator.device)
        return bool(self.accelerator.reduce(flag, reduction="sum").item())


def train(
    args: TrainingArguments,
    model: PASamModel | None = None,
    processor: PASamProcessor | None = None,
    train_records: Iterable | None = None,
    eval_records: Iterable | None = None,
) -> TrainingResult:
    """Fine-tune PA-SAM as configured by `args` and save the result in `args.output_dir`.

    `model`, `processor` and `train_records` / `eval_records` (iterables of `SegmentationRecord`) may be given
    directly instead of `args.model` / `args.data` / `args.eval_data` (the offline demo does). A run that fails
    before saving a checkpoint takes back what it created in `args.output_dir` (the directory itself, its logs).
    """
    run_directory = _RunDirectory(Path(args.output_dir))
    try:
        return _train(args, model, processor, train_records, eval_records)
    except BaseException:
        run_directory.clean_up()
        raise


def _train(
    args: TrainingArguments,
    model: PASamModel | None,
    processor: PASamProcessor | None,
    train_records: Iterable | None,
    eval_records: Iterable | None,
) -> TrainingResult:
    output_dir = Path(args.output_dir)
    # ---------------------------------------------------------------------------------------------------------
    # 1. Accelerator: devices, processes, mixed precision, gradient accumulation, trackers.
    # ---------------------------------------------------------------------------------------------------------
    report_to = None if args.report_to in ("none", "") else args.report_to
    # A stream with --steps-per-epoch is read on across epochs and passes: its optimizer steps are always
    # `gradient_accumulation_steps` batches, also where a pass of the stream ends, so an epoch is exactly
    # --steps-per-epoch steps. Otherwise an epoch is one pass, and its last step takes the batches left.
    steps_across_passes = args.steps_per_epoch is not None and args.embedding_cache is None and (
        args.streaming if train_records is None else not isinstance(train_records, Sequence)
    )
    try:
        accelerator = Accelerator(
            gradient_accumulation_plugin=GradientAccumulationPlugin(
                num_steps=args.gradient_accumulation_steps, sync_with_dataloader=not steps_across_passes
            ),
            mixed_precision=args.mixed_precision,
            log_with=report_to,
            project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / "logs")),
            dataloader_config=DataLoaderConfiguration(
                # The sampler's shuffle is a function of (seed, epoch), so a resumed epoch replays the same order.
                use_seedable_sampler=True,
                # Streamed data: every process reads the stream and keeps its own share, rather than the main
                # process broadcasting batches (ours hold names and variable instance counts, not just tensors).
                dispatch_batches=False,
            ),
        )
    except ValueError as error:
        if args.mixed_precision == "fp16" and "fp16" in str(error):
            raise ValueError(
                f"--mixed-precision fp16 needs a GPU ({error}); use --mixed-precision bf16 on a CPU, or no."
            ) from error
        raise
    if args.mixed_precision != "no" and not accelerator.native_amp:
        # Accelerate would quietly train in fp32 (fp16 on a CPU): say so rather than pretend.
        raise ValueError(
            f"--mixed-precision {args.mixed_precision} is not available on {accelerator.device.type} (Accelerate "
            "would train in fp32 without autocast); fp16 needs a GPU: use --mixed-precision bf16 on a CPU, or no."
        )
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched > 1 and accelerator.num_processes == 1:
        # Every process would train alone and write the same output directory.
        raise ValueError(
            f"{launched} processes were launched but Accelerate runs each one alone (no GPU for --multi_gpu). On "
            "CPUs launch with ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes N ... (or set "
            "distributed_type MULTI_CPU in `accelerate config`)."
        )
    if accelerator.distributed_type == DistributedType.FSDP and not accelerator.is_fsdp2:
        # Only FSDP2 is tested with this loop (docs/training.md); FSDP1 is what --use_fsdp gives by default.
        raise ValueError(
            "FSDP version 1 (Accelerate's default for --use_fsdp) is not supported by this training loop: use FSDP2 "
            "(accelerate launch --use_fsdp --fsdp_version 2 ..., or fsdp_version: 2 in `accelerate config`), or DDP "
            "(--multi_gpu), which is enough here: only about 1 M parameters train."
        )
    set_seed(args.seed)
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
    if report_to is not None:
        accelerator.init_trackers("pasam", config=_trackers_config(args))

    # ---------------------------------------------------------------------------------------------------------
    # 2. Model: SAM or PA-SAM checkpoint; only the release's trained set gets gradients.
    # ---------------------------------------------------------------------------------------------------------
    if model is None:
        if args.model is None:
            raise ValueError(
                "no model to fine-tune: pass train(model=...), or TrainingArguments(model=...) with a PA-SAM or SAM "
                "checkpoint (Hub id or directory)."
            )
        model, processor = load_model_and_processor(args.model)
    elif processor is None:
        processor = PASamProcessor.from_model_config(model.config)
    trainable_names = mark_trainable(model)
    model.train()

    # ---------------------------------------------------------------------------------------------------------
    # 3. Data: records -> augmented views (workers) -> prompts drawn per batch (main process).
    # ---------------------------------------------------------------------------------------------------------
    dataset = _build_dataset(args, model, processor, train_records)
    streamed = isinstance(dataset, IterableDataset)
    if streamed and args.steps_per_epoch is None and args.max_steps is None:
        raise ValueError(
            "the training data is a stream without a length: pass --steps-per-epoch (for the learning-rate schedule "
            "and point-mining warm-up) or --max-steps."
        )
    if not streamed and args.steps_per_epoch is not None:
        source = "the embedding cache" if args.embedding_cache is not None else "the training data"
        raise ValueError(
            f"--steps-per-epoch sets the epoch length of streamed data, but {source} is not streamed (an epoch is "
            f"one pass over its {len(dataset)} samples): drop --steps-per-epoch, or use --max-steps to stop earlier."
        )
    if args.streaming and not streamed and args.embedding_cache is None and accelerator.is_main_process:
        print(
            f"warning: --streaming has no effect on {args.data or 'these records'}: only a datasets dataset is "
            f"streamed (a folder is read file by file anyway); an epoch is one pass over its {len(dataset)} samples.",
            file=sys.stderr,
        )
    if eval_records is None and args.eval_data is not None:
        # Read now, so a wrong path or split stops the run before any training rather than after an epoch.
        eval_records = load_records_from_flags(args, args.eval_data, split=args.eval_split)
    run_identity = _run_identity(args, model, trainable_names, dataset, accelerator)
    dataloader = DataLoader(
        dataset,
        batch_size=args.batch_size,
        shuffle=not streamed,
        collate_fn=_keep_items,
        num_workers=args.num_workers,
        worker_init_fn=_ignore_interrupts if args.num_workers else None,
    )
    prompt_generator = torch.Generator()
    collator = PASamDataCollator(
        PromptSimulator(
            preset=args.prompt_preset,
            num_points=args.num_points,
            num_negative_points=args.num_negative_points,
            mask_prompt_values=args.mask_prompt_values,
            generator=prompt_generator,
        ),
        max_instances_per_image=args.max_instances_per_image,
    )
    bad_samples = BadSampleTracker(max_fraction=args.max_bad_fraction)

    # ---------------------------------------------------------------------------------------------------------
    # 4. Optimizer and schedule: Adam, learning rate x gamma every `lr_decay_epochs` epochs (release: 10, 0.1).
    # ---------------------------------------------------------------------------------------------------------
    optimizer = torch.optim.Adam(
        [p for p in model.parameters() if p.requires_grad], lr=args.learning_rate, weight_decay=args.weight_decay
    )
    model, optimizer, dataloader = accelerator.prepare(model, optimizer, dataloader)
    if streamed:
        batches_per_epoch = args.steps_per_epoch * args.gradient_accumulation_steps if args.steps_per_epoch else None
    else:
        batches_per_epoch = len(dataloader)
    steps_per_epoch = (
        math.ceil(batches_per_epoch / args.gradient_accumulation_steps) if batches_per_epoch else args.max_steps
    )
    # StepLR counts optimizer steps here (not epochs) so the decay lands mid-epoch correctly after a resume; it is
    # not passed to accelerator.prepare, which would step it once per process.
    scheduler = torch.optim.lr_scheduler.StepLR(
        optimizer, step_size=max(1, args.lr_decay_epochs * steps_per_epoch), gamma=args.lr_decay_gamma
    )
    accelerator.register_for_checkpointing(scheduler)
    # --max-steps overrides --num-epochs: the run goes on over as many epochs as it takes.
    total_steps = args.max_steps or steps_per_epoch * args.num_epochs
    unwrapped: PASamModel = accelerator.unwrap_model(model)

    # ---------------------------------------------------------------------------------------------------------
    # 5. Resume: trained weights, optimizer, schedule, RNG and the position in the epoch.
    # ---------------------------------------------------------------------------------------------------------
    checkpoints = CheckpointManager(
        accelerator, args.checkpoint_dir, trainable_names, keep=args.keep_checkpoints, run=run_identity
    )
    state = TrainerState()
    if args.resume:
        for leftover in checkpoints.remove_incomplete():
            accelerator.print(f"removed the interrupted checkpoint {leftover}")
        path = checkpoints.resolve(args.resume)
        state = checkpoints.load(path)
        accelerator.print(f"resumed from {path} (step {state.global_step}, epoch {state.epoch})")
    result = TrainingResult(global_step=state.global_step, epochs_completed=state.epoch, output_dir=str(output_dir))
    stream = _StreamReader(accelerator, dataloader, dataset, state) if streamed else None
    if args.embedding_cache is not None:
        _report_cached_bad_samples(accelerator, dataset, bad_samples, result)

    # ---------------------------------------------------------------------------------------------------------
    # 6. Train.
    # ---------------------------------------------------------------------------------------------------------
    progress = tqdm(
        total=total_steps,
        initial=state.global_step,
        disable=not (args.progress and accelerator.is_local_main_process),
        desc="fine-tuning PA-SAM",
        unit="step",
    )
    running_loss = torch.zeros((), device=accelerator.device)
    running_count = 0
    evaluating = eval_records is not None or args.eval_data is not None
    evaluated_step = None
    started = time.perf_counter()
    stop_request = _StopRequest(accelerator)
    stopped = False
    try:
        stop_request.__enter__()
        while state.global_step < total_steps and (args.max_steps is not None or state.epoch < args.num_epochs):
            epoch = state.epoch
            # Hard point mining starts after the warm-up (release: epoch 5).
            unwrapped.set_point_mining(epoch >= args.point_mining_warmup_epochs)
            if streamed:
                epoch_loader = stream.epoch_batches(batches_per_epoch)
            else:
                if hasattr(dataloader, "set_epoch"):
                    dataloader.set_epoch(epoch)
                if hasattr(dataset, "set_epoch"):
                    dataset.set_epoch(epoch)
                epoch_loader = dataloader
                if state.batches_in_epoch:
                    epoch_loader = accelerator.skip_first_batches(dataloader, state.batches_in_epoch)
            reached_max_steps = False
            for items in epoch_loader:
                # Between optimizer steps (no gradients accumulated): the state describes the last completed step,
                # and the batch just fetched is not counted, so a resumed run reads it again.
                if accelerator.sync_gradients and stop_request.agreed():
                    stopped = True
                    break
                batch_index = state.batches_in_epoch
                state.batches_in_epoch += 1
                state.batches_in_pass += 1
                seed = batch_seed(args.seed, epoch, batch_index, accelerator.process_index)
                prompt_generator.manual_seed(seed)
                # The Gumbel noise of point mining comes from torch's global RNG (on the model's device), which a
                # resumed run reaches in another state (skip_first_batches draws a DataLoader base seed from it):
                # re-seed it per batch so a resumed run draws exactly the noise of an uninterrupted one.
                torch.manual_seed(seed ^ 0x5DEECE66D)
                batch = collator(items)
                bad_samples.add(_counted_samples(accelerator, items, args.batch_size))
                _check_data_quality(accelerator, bad_samples)
                outcome, loss = _training_step(accelerator, model, optimizer, batch, args)
                if outcome != "ok" and accelerator.sync_gradients:
                    # The step's gradients were dropped: so is the loss of its earlier micro-batches.
                    running_loss.zero_()
                    running_count = 0
                if outcome == "no_data":
                    # Every sample of this batch was bad on some process: all processes skip it together (a
                    # process without data cannot take part in the gradient all-reduce). Not an optimizer step.
                    continue
                if outcome == "nonfinite":
                    # Non-finite loss on some process: every process skipped this step together.
                    state.nonfinite_steps += 1
                    state.consecutive_nonfinite_steps += 1
                    accelerator.print(
                        f"step {state.global_step}: non-finite loss, step skipped "
                        f"({state.consecutive_nonfinite_steps} in a row, limit {args.max_nonfinite_steps})"
                    )
                    if state.consecutive_nonfinite_steps >= args.max_nonfinite_steps:
                        raise TrainingDivergedError(
                            f"the loss was NaN/inf for {state.consecutive_nonfinite_steps} steps in a row at step "
                            f"{state.global_step}; training stopped and the last good checkpoint "
                            f"({checkpoints.latest() or 'none yet'}) is intact. Lower --learning-rate, use "
                            "--mixed-precision bf16 instead of fp16, or check the data; then --resume."
                        )
                    continue
                running_loss += loss
                running_count += 1
                if not accelerator.sync_gradients:
                    continue
                # One optimizer step done (after gradient accumulation).
                state.consecutive_nonfinite_steps = 0
                if not accelerator.optimizer_step_was_skipped:
                    scheduler.step()
                state.global_step += 1
                step_loss = accelerator.gather(running_loss / max(running_count, 1)).mean().item()
                running_loss.zero_()
                running_count = 0
                result.losses.append(step_loss)
                progress.update(1)
                progress.set_postfix(loss=f"{step_loss:.4f}", epoch=epoch)
                if state.global_step % args.log_every == 0 or state.global_step == 1:
                    accelerator.log(
                        {"train/loss": step_loss, "train/lr": scheduler.get_last_lr()[0], "train/epoch": epoch},
                        step=state.global_step,
                    )
                if state.global_step % args.checkpoint_every == 0:
                    result.last_checkpoint = str(checkpoints.save(state))
                if state.global_step >= total_steps:
                    reached_max_steps = True
                    break
            if stopped:
                break
            # The last step may also have been the epoch's last batch: that epoch is complete all the same.
            epoch_complete = not reached_max_steps or (
                batches_per_epoch is not None and state.batches_in_epoch >= batches_per_epoch
            )
            if not epoch_complete:
                break
            # The epoch ran to its end: report its data problems, evaluate, move on.
            _end_of_epoch(accelerator, bad_samples, state, result)
            state.epoch += 1
            state.batches_in_epoch = 0
            if not streamed:
                state.batches_in_pass = 0
            if evaluating:
                full_model = _full_model(accelerator, model, unwrapped, accelerator.device)
                _evaluate(accelerator, full_model, processor, args, eval_records, state, f"epoch {epoch}")
                evaluated_step = state.global_step
                unwrapped.train()
        if stopped:
            # Ctrl-C: keep what was learnt; an interrupted run resumes from here with --resume, bit for bit.
            if state.global_step > 0:
                result.last_checkpoint = str(checkpoints.save(state))
                accelerator.print(f"interrupted: progress saved to {result.last_checkpoint}; continue with --resume")
            raise KeyboardInterrupt
    except KeyboardInterrupt:
        if not stopped:
            # A second Ctrl-C (or one outside the main thread's handler): the state may be mid-step, not saved.
            accelerator.print(
                f"interrupted at once: nothing saved since {checkpoints.latest() or 'the start'}; --resume continues "
                "from the last checkpoint"
            )
        raise
    finally:
        stop_request.__exit__()
        progress.close()

    # ---------------------------------------------------------------------------------------------------------
    # 7. Save: a last checkpoint, the full model + processor (loadable with from_pretrained), the adapter alone.
    # ---------------------------------------------------------------------------------------------------------
    if evaluating and evaluated_step != state.global_step:
        # Stopped by --max-steps inside an epoch: the saved weights are evaluated too.
        full_model = _full_model(accelerator, model, unwrapped, accelerator.device)
        _evaluate(accelerator, full_model, processor, args, eval_records, state, f"step {state.global_step}")
        unwrapped.train()
    result.global_step = state.global_step
    result.epochs_completed = state.epoch
    result.nonfinite_steps = state.nonfinite_steps
    _record_bad_samples(result, gather_object(bad_samples.details))  # those of an epoch stopped by --max-steps
    result.last_checkpoint = str(checkpoints.save(state))
    full_model = _full_model(accelerator, model, unwrapped)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        full_model.save_pretrained(output_dir)
        processor.save_pretrained(output_dir)
        save_adapter(full_model, output_dir / "adapter")
        seconds = time.perf_counter() - started
        accelerator.print(
            f"done: {state.global_step} steps in {seconds:.0f} s; model in {output_dir}, adapter in "
            f"{output_dir / 'adapter'}"
        )
        if args.push_to_hub:
            _push_to_hub(output_dir, args)
    accelerator.end_training()
    return result


class _StreamReader:
    """Batches of streamed data for the epochs of a run, read on across epochs.

    With --steps-per-epoch an epoch is that many optimizer steps, whatever the length of the stream: the next epoch
    goes on where the last one stopped, and a stream that ends is read again from its start (a new pass, with new
    augmentations: `dataset.set_epoch(pass)`). Without it an epoch is one pass. `state.stream_pass` and
    `state.batches_in_pass` say where the reading stands, so a resumed run reads on from the same batch.
    """

    def __init__(self, accelerator: Accelerator, dataloader: DataLoader, dataset: IterableDataset, state: TrainerState):
        self.accelerator, self.dataloader, self.dataset, self.state = accelerator, dataloader, dataset, state
        self.batches = None

    def _start_pass(self) -> None:
        state = self.state
        if hasattr(self.dataloader, "set_epoch"):
            self.dataloader.set_epoch(state.stream_pass)
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(state.stream_pass)
        loader = self.dataloader
        if state.batches_in_pass:
            loader = self.accelerator.skip_first_batches(self.dataloader, state.batches_in_pass)
        self.batches = iter(loader)

    def epoch_batches(self, batches_per_epoch: int | None) -> Iterator[list]:
        """The batches left in the current epoch; the caller counts each one it uses in `state.batches_in_*`."""
        state = self.state
        while batches_per_epoch is None or state.batches_in_epoch < batches_per_epoch:
            if self.batches is None:
                self._start_pass()
            try:
                items = next(self.batches)
            except StopIteration:
                self.batches = None
                if state.batches_in_pass == 0:
                    raise ValueError("the training stream yielded no sample; check --data and --split.") from None
                state.stream_pass += 1
                state.batches_in_pass = 0
                if batches_per_epoch is None:
                    return  # an epoch is one pass
                continue
            yield items


def _training_step(
    accelerator: Accelerator,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    batch: dict[str, Any],
    args: TrainingArguments,
) -> tuple[str, torch.Tensor | None]:
    """One forward/backward under gradient accumulation.

    Returns `("ok", detached loss)`, or `("no_data", None)` when some process had only bad samples, or
    `("nonfinite", None)` when the loss was not finite on some process. In both latter cases no process runs the
    backward (DDP's all-reduce needs every process) and, on the micro-batch that would step, the gradients are
    dropped, so the processes stay in sync. Whether every process has data is agreed before the forward: under FSDP
    the forward itself is collective (it gathers the weight shards), so every process runs it or none does.
    """
    usable = "labels" in batch
    with accelerator.accumulate(model):
        # Per process: has data (ints: gloo gathers no bools).
        if not bool(accelerator.gather(torch.tensor([int(usable)], device=accelerator.device)).all()):
            optimizer.zero_grad(set_to_none=True)  # a no-op except on the micro-batch that would step
            return "no_data", None
        inputs = {key: batch[key] for key in MODEL_INPUTS if key in batch}
        if batch.get("image_embeddings") is not None:
            inputs["image_embeddings"] = batch["image_embeddings"]
        else:
            # The image encoder runs inside the prepared model's forward: FSDP (and DeepSpeed ZeRO-3) gather
            # sharded weights only around that call, so a direct `unwrapped.get_image_embeddings` would meet
            # weight shards. The encoder is frozen and its input needs no gradient: autograd records nothing.
            inputs["pixel_values"] = batch["pixel_values"]
        # With mixed precision the prepared model runs under autocast; the loss inside it opts out (fp32).
        loss = model(multimask_output=False, **inputs).loss
        # Per process: has a non-finite loss.
        nonfinite = torch.tensor([int(not torch.isfinite(loss.detach()))], device=accelerator.device)
        if bool(accelerator.gather(nonfinite).any()):
            optimizer.zero_grad(set_to_none=True)
            return "nonfinite", None
        accelerator.backward(loss)
        if accelerator.sync_gradients and args.max_grad_norm:
            accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return "ok", loss.detach()


def _counted_samples(accelerator: Accelerator, items: list[dict[str, Any]], batch_size: int) -> dict[str, Any]:
    """The names and bad samples of this process's `items` that count for the bad-sample report.

    With several processes Accelerate evens out the epoch's last batches by repeating the epoch's first samples
    (`even_batches`); those copies are trained on again but are not new samples, so they are not counted (a bad
    one would be reported twice). In the last batch, the first `remainder` samples in process order are real.
    """
    state = accelerator.gradient_state
    if accelerator.num_processes > 1 and state.end_of_dataloader and state.remainder > 0:
        items = items[: max(0, min(len(items), state.remainder - accelerator.process_index * batch_size))]
    return sample_report(items)


def _report_cached_bad_samples(
    accelerator: Accelerator, cache: Any, tracker: BadSampleTracker, result: TrainingResult
) -> None:
    """Samples `pasam cache` could not use are not in the embedding cache: report them as a run on the data
    would, and stop if there are too many under this run's --max-bad-fraction."""
    samples, total = cache.bad_samples, cache.num_records
    if not samples:
        return
    _record_bad_samples(result, samples)
    shown = ", ".join(f"{sample['name']} ({sample['reason']})" for sample in samples[:10])
    more = f" and {len(samples) - 10} more" if len(samples) > 10 else ""
    accelerator.print(
        f"the embedding cache {cache.cache_dir} left out {len(samples)} of {total} samples that could not be used: "
        f"{shown}{more}"
    )
    if tracker.exceeds(total, len(samples), complete=True):
        raise DataQualityError(tracker.message(total, samples))


class _RunDirectory:
    """What a run adds to its output directory, taken back when the run fails before keeping anything (no
    checkpoint, no model): a failed first run would otherwise leave a folder holding only TensorBoard logs. What
    existed before the run is never touched."""

    def __init__(self, output_dir: Path):
        self.output_dir = output_dir
        self.existed = output_dir.exists()
        self.logs_existed = (output_dir / "logs").exists()

    def clean_up(self) -> None:
        if os.environ.get("RANK", "0") != "0" or not self.output_dir.is_dir():
            return  # one process cleans up; the others see the same directory
        checkpoints = self.output_dir / "checkpoints"
        kept = (self.output_dir / "model.safetensors").exists() or (
            checkpoints.is_dir() and any(not path.name.startswith(".") for path in checkpoints.iterdir())
        )
        if kept:
            return
        import shutil

        if not self.existed:
            shutil.rmtree(self.output_dir, ignore_errors=True)
        elif not self.logs_existed:
            shutil.rmtree(self.output_dir / "logs", ignore_errors=True)


def _check_data_quality(accelerator: Accelerator, tracker: BadSampleTracker, epoch_complete: bool = False) -> None:
    """Raise [`DataQualityError`] on every process when the bad fraction over all processes is too high.

    During the epoch the fraction is checked once `tracker.min_samples` samples were seen (one early bad file does
    not abort); at the end of an epoch it is exact, so it is checked whatever the dataset size.
    """
    local = torch.tensor([tracker.seen, tracker.bad], device=accelerator.device)
    seen, bad = (int(value) for value in accelerator.reduce(local, reduction="sum").tolist())
    if tracker.exceeds(seen, bad, complete=epoch_complete):
        details = gather_object(tracker.details)
        raise DataQualityError(tracker.message(seen, details))


def _record_bad_samples(result: TrainingResult, samples: list[dict[str, str]]) -> None:
    known = {sample["name"] for sample in result.bad_samples}
    for sample in samples:
        if sample["name"] not in known:
            known.add(sample["name"])
            result.bad_samples.append(dict(sample))


def _end_of_epoch(
    accelerator: Accelerator, tracker: BadSampleTracker, state: TrainerState, result: TrainingResult
) -> None:
    """Report the epoch's bad samples (all processes), stop the run if there were too many, start a new count."""
    reports = gather_object([tracker.summary()])
    bad = sum(report["bad"] for report in reports)
    seen = sum(report["seen"] for report in reports)
    samples = [sample for report in reports for sample in report["samples"]]
    state.bad_samples += bad
    state.samples_seen += seen
    _record_bad_samples(result, samples)
    if bad:
        shown = ", ".join(f"{sample['name']} ({sample['reason']})" for sample in samples[:10])
        more = f" and {len(samples) - 10} more" if len(samples) > 10 else ""
        accelerator.print(
            f"epoch {state.epoch}: skipped {bad} of {seen} samples that could not be used: {shown}{more}"
        )
    _check_data_quality(accelerator, tracker, epoch_complete=True)
    tracker.reset()


def _full_model(
    accelerator: Accelerator, model: torch.nn.Module, unwrapped: PASamModel, device: torch.device | str = "cpu"
) -> PASamModel | None:
    """The whole trained model, for evaluation and saving on the main process; call it on every process.

    With one process or DDP every process holds all the weights: that is `unwrapped` itself. FSDP and DeepSpeed
    (ZeRO-3) shard them over the processes, so `unwrapped` holds only this process's shards; there the full state
    dict is gathered (`accelerator.get_state_dict`, a collective: every process takes part) and loaded into a copy
    on `device` on the main process. Returns `None` on the other processes then.
    """
    if accelerator.distributed_type not in (DistributedType.FSDP, DistributedType.DEEPSPEED):
        return unwrapped
    state_dict = accelerator.get_state_dict(model)
    if not accelerator.is_main_process:
        return None
    with torch.device("meta"):
        full_model = type(unwrapped)(unwrapped.config)
    # assign=True: the gathered tensors become the weights as they are (their dtype; no second copy).
    full_model.load_state_dict(state_dict, assign=True)
    # The gathered dict holds the tied positional embedding twice; tie it again, so it is saved once, as SAM's.
    full_model.tie_weights()
    return full_model.to(device)


def _evaluate(accelerator, model, processor, args, eval_records, state, label: str) -> None:
    """Evaluate on the main process (box prompts, docs/evaluation.md), print `<label> evaluation: ...` and log it."""
    from ..evaluation import evaluate_model

    if not accelerator.is_main_process:
        accelerator.wait_for_everyone()
        return
    if eval_records is None:
        eval_records = load_records_from_flags(args, args.eval_data, split=args.eval_split)
    metrics = evaluate_model(model, processor, eval_records, progress=False)
    average = metrics.mean_of_means()
    accelerator.print(
        f"{label} evaluation: mIoU {100 * average['mean_iou']:.2f}, mBIoU "
        f"{100 * average['mean_boundary_iou']:.2f} over {len(metrics)} objects ({metrics.skipped} skipped)"
    )
    # The average is the mean of the subset means (docs/evaluation.md); each subset is logged too.
    logged = {f"eval/{key}": value for key, value in average.items()}
    for subset, means in metrics.subset_means().items():
        if subset:
            logged.update({f"eval/{subset}/{key}": means[key] for key in ("mean_iou", "mean_boundary_iou")})
    accelerator.log(logged, step=state.global_step)
    accelerator.wait_for_everyone()


def _push_to_hub(output_dir: Path, args: TrainingArguments) -> None:
    """Upload the saved model, processor and adapter (not the checkpoints or logs) to `args.push_to_hub`."""
    import shlex

    from huggingface_hub import HfApi

    try:
        api = HfApi()
        api.create_repo(args.push_to_hub, private=args.hub_private, exist_ok=True)
        if args.hub_revision:
            api.create_branch(args.push_to_hub, branch=args.hub_revision, exist_ok=True)
        url = api.upload_folder(
            repo_id=args.push_to_hub,
            folder_path=str(output_dir),
            revision=args.hub_revision,
            ignore_patterns=list(HUB_IGNORE_PATTERNS),
            commit_message="Upload PA-SAM fine-tuned with pasam-hf",
        )
    except Exception as error:  # noqa: BLE001 - network, auth and permission errors all leave the same remedy
        reason = " ".join(str(error).split()) or type(error).__name__
        command = ["hf", "upload", args.push_to_hub, str(output_dir)]
        if args.hub_revision:
            command += ["--revision", args.hub_revision]
        if args.hub_private:
            command.append("--private")
        for pattern in HUB_IGNORE_PATTERNS:  # `hf upload` takes one pattern per --exclude
            command += ["--exclude", pattern]
        raise HubUploadError(
            f"the model was trained and saved in {output_dir}, but uploading it to the Hub repository "
            f"{args.push_to_hub!r} failed ({type(error).__name__}: {reason}). Check the network and your token "
            f"(`hf auth login`), then upload it with `{shlex.join(command)}`."
        ) from error
    print(f"uploaded to {url}")


__all__ = ["HubUploadError", "TrainingDivergedError", "TrainingResult", "batch_seed", "mark_trainable", "train"]
