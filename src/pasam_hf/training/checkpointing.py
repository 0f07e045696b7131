"""Atomic training checkpoints on top of `Accelerator.save_state`.

A checkpoint is first written to `checkpoints/.incomplete-step_N/` and renamed to `checkpoints/step_N/` only
after every process has finished writing and `trainer_state.json` is in place. A rename within one directory is
atomic, so a run killed at any moment leaves either the previous checkpoints untouched or the new one complete;
resume ignores (and cleans up) the `.incomplete-*` leftovers.

Only the trained parameters are stored (about 1 M of SAM's 90-640 M): a pre-save hook drops the frozen ones from
the model state, and a pre-load hook checks that a checkpoint holds exactly the trained set before loading it.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

from accelerate import Accelerator
from accelerate.utils import DistributedType
from safetensors import safe_open

STATE_FILE = "trainer_state.json"
CHECKPOINT_PREFIX = "step_"
INCOMPLETE_PREFIX = ".incomplete-"
MODEL_FILE = "model.safetensors"


class CheckpointError(RuntimeError):
    """A checkpoint cannot be used to resume: the message names the directory and what to do."""


@dataclass
class TrainerState:
    """Where a run stands; saved as JSON next to Accelerate's state so a person can read it too."""

    global_step: int = 0
    epoch: int = 0
    # Batches of `epoch` already consumed (including skipped ones), so resume skips exactly these.
    batches_in_epoch: int = 0
    # Streamed data: passes over the stream completed, and batches read in the current one (a streamed epoch of
    # --steps-per-epoch steps may end inside a pass). For map-style data a pass is an epoch.
    stream_pass: int = 0
    batches_in_pass: int = 0
    nonfinite_steps: int = 0
    consecutive_nonfinite_steps: int = 0
    bad_samples: int = 0
    samples_seen: int = 0
    trainable_parameters: list[str] = field(default_factory=list)
    # What makes the run this run (model, data, the settings the saved position and optimizer depend on): a
    # checkpoint resumes only the run it was saved by. See `CheckpointManager(run=...)`.
    run: dict = field(default_factory=dict)

    def save(self, directory: Path) -> None:
        path = directory / STATE_FILE
        with open(path, "w") as handle:
            json.dump(asdict(self), handle, indent=2)
            handle.flush()
            os.fsync(handle.fileno())

    @classmethod
    def load(cls, directory: Path) -> TrainerState:
        path = directory / STATE_FILE
        try:
            return cls(**json.loads(path.read_text()))
        except (OSError, json.JSONDecodeError, TypeError) as error:
            raise CheckpointError(
                f"{path} is missing or unreadable ({error}); this is not a complete pasam checkpoint. Resume from "
                "another one (`--resume DIR`) or start afresh without --resume."
            ) from error


def _fsync_tree(directory: Path) -> None:
    """Flush every file of a freshly written checkpoint to disk before it is published by the rename."""
    for path in directory.rglob("*"):
        if path.is_file():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
    descriptor = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


class CheckpointManager:
    """Saves, lists, prunes and restores the checkpoints of one run under `checkpoint_dir`.

    Args:
        accelerator (`Accelerator`): the run's accelerator (the model, optimizer and dataloader are prepared).
        checkpoint_dir (`Path`): `<output_dir>/checkpoints`.
        trainable_names (`list[str]`): names of the trained parameters (without DDP's `module.` prefix).
        keep (`int`): how many complete checkpoints to keep; older ones are deleted after a new one is published.
        run (`dict`, *optional*): what identifies the run (JSON values; see `RUN_KEYS`), saved with every checkpoint
            and compared on resume: a checkpoint of another run raises a [`CheckpointError`] naming what differs.
    """

    def __init__(
        self,
        accelerator: Accelerator,
        checkpoint_dir: Path,
        trainable_names: list[str],
        keep: int = 2,
        run: dict | None = None,
    ):
        self.accelerator = accelerator
        self.checkpoint_dir = Path(checkpoint_dir)
        self.trainable_names = sorted(trainable_names)
        self.keep = keep
        # As it reads back from trainer_state.json (tuples become lists).
        self.run = json.loads(json.dumps(run or {}))
        self._filters_weights = accelerator.distributed_type not in (
            DistributedType.FSDP,
            DistributedType.DEEPSPEED,
            DistributedType.MEGATRON_LM,
        )
        if self._filters_weights:
            accelerator.register_save_state_pre_hook(self._keep_trainable_weights)
            accelerator.register_load_state_pre_hook(self._check_checkpoint_weights)

    @staticmethod
    def _strip(name: str) -> str:
        return name[len("module.") :] if name.startswith("module.") else name

    def _keep_trainable_weights(self, models, weights, output_dir) -> None:
        wanted = set(self.trainable_names)
        for index, state in enumerate(weights):
            weights[index] = {name: tensor for name, tensor in state.items() if self._strip(name) in wanted}

    def _check_checkpoint_weights(self, models, input_dir) -> None:
        path = Path(input_dir) / MODEL_FILE
        if not path.is_file():
            raise CheckpointError(f"{input_dir} has no {MODEL_FILE}; it is not a pasam training checkpoint.")
        with safe_open(str(path), framework="pt") as handle:
            saved = sorted(self._strip(name) for name in handle.keys())
        if saved != self.trainable_names:
            missing = sorted(set(self.trainable_names) - set(saved))
            extra = sorted(set(saved) - set(self.trainable_names))
            raise CheckpointError(
                f"{input_dir} was written for another set of trained parameters (missing {missing[:5]}, unexpected "
                f"{extra[:5]}); resume with the same model and settings it was trained with."
            )

    def _check_run(self, saved: dict, path: Path) -> None:
        if not saved or not self.run:
            return  # a checkpoint of an earlier version, or a caller that identifies no run
        differences = [
            describe(saved, self.run)
            for key, describe in RUN_KEYS.items()
            if key in saved and key in self.run and saved[key] != self.run[key]
        ]
        if differences:
            raise CheckpointError(
                f"{path} was saved by another run: {'; '.join(differences)}. Resume with the model, data and settings "
                "it was trained with, or start a new run in another --output-dir."
            )

    # -- listing ---------------------------------------------------------------------------------------------
    def complete_checkpoints(self) -> list[Path]:
        """Published checkpoints, oldest first."""
        if not self.checkpoint_dir.is_dir():
            return []
        found = []
        for path in self.checkpoint_dir.iterdir():
            if path.is_dir() and path.name.startswith(CHECKPOINT_PREFIX) and (path / STATE_FILE).is_file():
                try:
                    found.append((int(path.name[len(CHECKPOINT_PREFIX) :]), path))
                except ValueError:
                    continue
        return [path for _, path in sorted(found)]

    def latest(self) -> Path | None:
        checkpoints = self.complete_checkpoints()
        return checkpoints[-1] if checkpoints else None

    # -- saving ----------------------------------------------------------------------------------------------
    def save(self, state: TrainerState) -> Path:
        """Write a checkpoint of the current step on every process and publish it atomically."""
        accelerator = self.accelerator
        final = self.checkpoint_dir / f"{CHECKPOINT_PREFIX}{state.global_step:08d}"
        staging = self.checkpoint_dir / f"{INCOMPLETE_PREFIX}{final.name}"
        if accelerator.is_main_process:
            shutil.rmtree(staging, ignore_errors=True)
            staging.mkdir(parents=True)
        accelerator.wait_for_everyone()
        accelerator.save_state(str(staging), safe_serialization=True)
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            state.trainable_parameters = self.trainable_names
            state.run = self.run
            state.save(staging)
            _fsync_tree(staging)
            if final.exists():
                # The same step saved twice (e.g. the final save right after a periodic one): keep the new one.
                shutil.rmtree(final)
            os.replace(staging, final)
            self._prune()
        accelerator.wait_for_everyone()
        return final

    def _prune(self) -> None:
        for path in self.complete_checkpoints()[: -self.keep]:
            shutil.rmtree(path, ignore_errors=True)

    def remove_incomplete(self) -> list[Path]:
        """Delete leftovers of saves that were interrupted (main process only); returns what was removed."""
        removed = []
        if self.accelerator.is_main_process and self.checkpoint_dir.is_dir():
            for path in self.checkpoint_dir.glob(f"{INCOMPLETE_PREFIX}*"):
                shutil.rmtree(path, ignore_errors=True)
                removed.append(path)
        self.accelerator.wait_for_everyone()
        return removed

    # -- loading ---------------------------------------------------------------------------------------------
    def resolve(self, resume: str) -> Path:
        """`"latest"` -> the newest complete checkpoint; a path -> that checkpoint, checked to be complete."""
        if resume == "latest":
            latest = self.latest()
            if latest is None:
                raise CheckpointError(
                    f"--resume: no complete checkpoint in {self.checkpoint_dir}; start without --resume (nothing "
                    "was saved yet) or pass the checkpoint directory."
                )
            return latest
        path = Path(resume)
        if not (path / STATE_FILE).is_file():
            raise CheckpointError(
                f"--resume {resume}: not a complete checkpoint (no {STATE_FILE}); use one of "
                f"{[p.name for p in self.complete_checkpoints()] or 'the step_* directories of a run'}."
            )
        return path

    def load(self, path: Path) -> TrainerState:
        """Restore model (trained part), optimizer, scheduler, RNG and sampler states; return the trainer state."""
        state = TrainerState.load(path)
        self._check_run(state.run, path)
        kwargs = {"strict": False} if self._filters_weights else {}
        self.accelerator.load_state(str(path), **kwargs)
        return state


def _flag(key: str, name: str):
    return lambda saved, current: f"{name} {saved[key]} there, {current[key]} here"


def _config_difference(saved_run: dict, current_run: dict) -> str:
    saved, current = saved_run["model_config"], current_run["model_config"]

    def flat(config: dict, prefix: str = "") -> dict:
        items = {}
        for key, value in config.items():
            items.update(flat(value, f"{prefix}{key}.") if isinstance(value, dict) else {f"{prefix}{key}": value})
        return items

    saved, current = flat(saved), flat(current)
    keys = sorted(key for key in saved.keys() | current.keys() if saved.get(key) != current.get(key))
    shown = ", ".join(f"{key} {saved.get(key)!r} there, {current.get(key)!r} here" for key in keys[:3])
    return f"another model configuration ({shown}{' and more' if len(keys) > 3 else ''})"


MODULE_NAMES = {
    "vision_encoder": "image encoder",
    "prompt_encoder": "prompt encoder",
    "mask_decoder": "mask decoder (its frozen part)",
    "shared_image_embedding": "positional embedding",
}


def _weights_difference(saved_run: dict, current_run: dict) -> str:
    saved, current = saved_run["model_weights"], current_run["model_weights"]
    modules = sorted(key for key in saved.keys() | current.keys() if saved.get(key) != current.get(key))
    return f"another model (the {', '.join(MODULE_NAMES.get(name, name) for name in modules)} weights differ)"


def _data_difference(saved: dict, current: dict) -> str:
    return f"other training data ({saved.get('data_description')} there, {current.get('data_description')} here)"


# Run identity, compared on resume, and how a difference is told (from the saved and the current identity; the data
# is compared by its fingerprint, `data_description` only tells it). What may change on resume (--max-steps or
# --num-epochs to train further, checkpointing, logging, evaluation, workers, precision) is not here. The optimizer
# and schedule settings are: the checkpoint's optimizer and scheduler state would silently override new values.
RUN_KEYS = {
    "model_config": _config_difference,
    "model_weights": _weights_difference,
    "data": _data_difference,
    "batch_size": _flag("batch_size", "--batch-size"),
    "gradient_accumulation_steps": _flag("gradient_accumulation_steps", "--gradient-accumulation-steps"),
    "num_processes": _flag("num_processes", "processes:"),
    "seed": _flag("seed", "--seed"),
    "steps_per_epoch": _flag("steps_per_epoch", "--steps-per-epoch"),
    "learning_rate": _flag("learning_rate", "--learning-rate"),
    "weight_decay": _flag("weight_decay", "--weight-decay"),
    "lr_decay_epochs": _flag("lr_decay_epochs", "--lr-decay-epochs"),
    "lr_decay_gamma": _flag("lr_decay_gamma", "--lr-decay-gamma"),
}


__all__ = ["CheckpointError", "CheckpointManager", "TrainerState"]
