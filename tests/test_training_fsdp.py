"""FSDP (torch's FSDP2, as Accelerate's `fsdp_version: 2` sets it up) on two CPU processes: training steps through
the sharded model, evaluation, atomic checkpoints, resume, and the final `save_pretrained` / `save_adapter`.

Accelerate 1.16 turns `--use_fsdp` into FSDP only on GPU-type devices: with ACCELERATE_USE_CPU=1 the same launch
silently runs DDP. The launched script here (`FSDP_ON_CPU`) therefore starts Accelerate's process state on CPU
(gloo) and then records the distributed type as multi-GPU, the one test-only change; from there on the run is
Accelerate's own FSDP2 path: `fully_shard` of the model (and of its `_no_split_modules` layers), the optimizer
switched to the shards, sharded (DCP) checkpoints and full state dicts.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pasam_hf import PASamModel

from test_training import REPO, save_tiny_model, shape_records, subprocess_env, write_corrupt_pair, write_folder

FSDP_ON_CPU = textwrap.dedent(
    """
    import runpy, sys
    from accelerate import PartialState
    from accelerate.utils import DistributedType

    # Accelerate enables FSDP only for GPU-type distributed types; gloo CPU processes pass for one here.
    PartialState(cpu=True)._shared_state["distributed_type"] = DistributedType.MULTI_GPU
    target, sys.argv = sys.argv[1], sys.argv[1:]
    if target == "-m":
        sys.argv = sys.argv[1:]
        runpy.run_module(sys.argv[0], run_name="__main__", alter_sys=True)
    else:
        runpy.run_path(target, run_name="__main__")
    """
)


def _free_port() -> str:
    with socket.socket() as probe:  # other runs may hold Accelerate's default 29500
        probe.bind(("127.0.0.1", 0))
        return str(probe.getsockname()[1])


def _launch(
    tmp_path: Path, mode: str, output_dir: Path, max_steps: int, *extra: str, script=None, data=True, returncode=0,
    mixed_precision: str = "no",
):
    """`accelerate launch` of 2 CPU processes, FSDP2 (`mode="fsdp"`), FSDP1 (`"fsdp1"`) or DDP (`"ddp"`), on the same
    data and flags."""
    if mode.startswith("fsdp"):
        driver = tmp_path / "fsdp_on_cpu.py"
        driver.write_text(FSDP_ON_CPU)
        launcher = ["--use_fsdp", "--fsdp_auto_wrap_policy", "TRANSFORMER_BASED_WRAP"]
        # FSDP1 is Accelerate's default; its plugin refuses to sync module states on CPU (before any of our code).
        launcher += ["--fsdp_version", "2"] if mode == "fsdp" else ["--fsdp_sync_module_states", "false",
                                                                     "--fsdp_cpu_ram_efficient_loading", "false"]
        script = [str(driver), *(script or [str(REPO / "examples" / "finetune.py")])]
    else:
        launcher = ["--multi_gpu"]
        script = script or [str(REPO / "examples" / "finetune.py")]
    command = [
        sys.executable, "-m", "accelerate.commands.launch", *launcher, "--num_processes", "2", "--num_machines", "1",
        "--mixed_precision", mixed_precision, "--dynamo_backend", "no", "--main_process_port", _free_port(), *script,
        "--model", str(tmp_path / "model"), "--output-dir", str(output_dir), "--batch-size", "1", "--max-steps",
        str(max_steps), "--checkpoint-every", "2", "--report-to", "none", "--no-progress", "--max-instances-per-image",
        "1", "--mixed-precision", mixed_precision, *extra,
    ]
    # The data, or (data=False) an embedding cache in `extra`, whose views were made with or without augmentation.
    command += ["--data", str(tmp_path / "data"), "--no-augment"] if data else []
    env = dict(subprocess_env(), ACCELERATE_USE_CPU="1")
    run = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=400)
    assert run.returncode == returncode, run.stderr[-4000:]
    return run


def _check_saved_run(output_dir: Path, start: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The saved model holds the tensors a one-process save holds (tied weights once) and reloads with
    from_pretrained, trained weights moved, frozen ones did not, and the adapter holds the model's trained weights;
    returns the model's state dict."""
    written = load_file(output_dir / "model.safetensors")
    assert written.keys() == load_file(output_dir.parent / "model" / "model.safetensors").keys()
    saved = PASamModel.from_pretrained(output_dir).state_dict()
    assert saved.keys() == start.keys()
    adapter = load_file(output_dir / "adapter" / "adapter_model.safetensors")
    assert adapter and all(torch.equal(adapter[name], saved[name]) for name in adapter)
    assert any(not torch.equal(saved[name], start[name]) for name in adapter)
    frozen = [name for name in saved if name not in adapter]
    assert frozen and all(torch.equal(saved[name], start[name]) for name in frozen)
    return saved


@pytest.fixture
def fsdp_run_inputs(tmp_path: Path) -> dict[str, torch.Tensor]:
    save_tiny_model(tmp_path / "model")
    write_folder(tmp_path / "data", shape_records(8))
    return PASamModel.from_pretrained(tmp_path / "model").state_dict()


def test_fsdp2_two_processes_train_evaluate_and_save(tmp_path: Path, fsdp_run_inputs) -> None:
    """Before the fix the first step failed: the loop ran the image encoder on the unwrapped model, whose weights
    FSDP holds as shards outside the prepared model's forward ("mixed torch.Tensor and DTensor"); the evaluation
    and the final save read those shards too. A broken file gives one process a batch with nothing to train on:
    under FSDP the forward is collective, so both processes must skip it (the other one alone ran it, and gloo
    aborted on the mismatched collectives)."""
    write_corrupt_pair(tmp_path / "data", "broken")
    run = _launch(tmp_path, "fsdp", tmp_path / "run", 5, "--eval-data", str(tmp_path / "data"), "--max-bad-fraction",
                  "0.5")
    # 9 samples on 2 processes: 5 batches each an epoch (Accelerate repeats one sample to even them out, which is
    # not counted as a sample), one of them broken.
    assert "epoch 0: skipped 1 of 9 samples that could not be used: broken (" in run.stdout
    assert "5 steps, final loss" in run.stdout
    assert "epoch 0 evaluation: mIoU" in run.stdout and "step 5 evaluation: mIoU" in run.stdout
    # Accelerate's FSDP checkpoint layout (DCP shards), not DDP's model.safetensors: FSDP really ran.
    checkpoint = tmp_path / "run" / "checkpoints" / "step_00000005"
    assert (checkpoint / "pytorch_model_fsdp_0" / ".metadata").is_file()
    assert not (checkpoint / "model.safetensors").exists()
    _check_saved_run(tmp_path / "run", fsdp_run_inputs)


def test_fsdp1_is_refused_with_the_fix(tmp_path: Path, fsdp_run_inputs) -> None:
    """`--use_fsdp` alone gives FSDP version 1, which this loop does not support (only FSDP2 is tested): one line
    naming the fix, exit code 2, no traceback, nothing trained."""
    run = _launch(tmp_path, "fsdp1", tmp_path / "run", 2, script=["-m", "pasam_hf", "train"], returncode=1)
    errors = [line for line in run.stderr.splitlines() if line.startswith("pasam train: error:")]
    assert len(errors) == 2, run.stderr[-4000:]  # one per process
    assert "FSDP version 1" in errors[0] and "--fsdp_version 2" in errors[0] and "--multi_gpu" in errors[0]
    # The launcher reports the failed processes with its own traceback; none runs through our code.
    assert "loop.py" not in run.stderr and "[rank0]: Traceback" not in run.stderr
    assert not (tmp_path / "run" / "model.safetensors").exists()


@pytest.mark.heavy
def test_fsdp2_resume_and_final_weights_equal_ddp(tmp_path: Path, fsdp_run_inputs) -> None:
    """3 steps of DDP, and 2 steps of FSDP2 resumed (`pasam train --resume`) for a third: same data, seeds and
    batch split (one sample per process and step), so the same prompts; the saved models are equal bit for bit
    (gloo averages the two processes' gradients in the same order both ways, and Adam is elementwise). So is a
    3-step FSDP2 run from an fp32 embedding cache of the same (unaugmented) views. A bf16 FSDP2 run trains and
    saves fp32 weights."""
    _launch(tmp_path, "ddp", tmp_path / "ddp", 3)
    ddp = _check_saved_run(tmp_path / "ddp", fsdp_run_inputs)
    _launch(tmp_path, "fsdp", tmp_path / "fsdp", 2)
    resumed = _launch(tmp_path, "fsdp", tmp_path / "fsdp", 3, "--resume", script=["-m", "pasam_hf", "train"])
    assert "resumed from" in resumed.stdout and "(step 2, epoch 0)" in resumed.stdout
    fsdp = _check_saved_run(tmp_path / "fsdp", fsdp_run_inputs)
    different = [name for name in ddp if not torch.equal(ddp[name], fsdp[name])]
    assert different == []
    # From the embedding cache (no image encoder in the step): the same views, so the same weights again.
    cache = [sys.executable, "-m", "pasam_hf", "cache", "--data", str(tmp_path / "data"), "--model",
             str(tmp_path / "model"), "--out", str(tmp_path / "cache"), "--views", "1", "--no-augment", "--dtype",
             "float32"]
    built = subprocess.run(cache, cwd=tmp_path, env=subprocess_env(), capture_output=True, text=True, timeout=200)
    assert built.returncode == 0, built.stderr[-2000:]
    _launch(tmp_path, "fsdp", tmp_path / "cached", 3, "--embedding-cache", str(tmp_path / "cache"), data=False)
    cached = _check_saved_run(tmp_path / "cached", fsdp_run_inputs)
    assert [name for name in ddp if not torch.equal(ddp[name], cached[name])] == []
    # bf16: FSDP2 computes in bf16 and keeps fp32 weights (Accelerate's MixedPrecisionPolicy); saved in fp32.
    _launch(tmp_path, "fsdp", tmp_path / "bf16", 2, mixed_precision="bf16")
    _check_saved_run(tmp_path / "bf16", fsdp_run_inputs)
    written = load_file(tmp_path / "bf16" / "model.safetensors")
    assert {tensor.dtype for tensor in written.values()} == {torch.float32}
