"""Stop and resume as users do it: Ctrl-C (SIGINT) during `pasam train`, then the same command with `--resume`,
gives the weights of the uninterrupted run bit for bit; `--resume` refuses a checkpoint of another run."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_training import save_tiny_model, shape_records, subprocess_env, write_folder

from pasam_hf.data import RecordSequence

STEPS = 16
BATCHES_PER_EPOCH = 3  # 6 images, batch 2


def _command(model: Path, data: Path, output_dir: Path, *extra: str) -> list[str]:
    return [
        sys.executable, "-m", "pasam_hf", "train", "--model", str(model), "--data", str(data),
        "--output-dir", str(output_dir), "--batch-size", "2", "--max-steps", str(STEPS), "--checkpoint-every", "100",
        "--report-to", "none", "--max-instances-per-image", "1", "--point-mining-warmup-epochs", "1", "--seed", "0",
        *extra,
    ]


class Interrupted:
    """`pasam train` with its progress bar on stderr; SIGINT `fraction` of a step after the bar showed
    `after_steps` completed steps (the step time measured from the bar itself), so the signal lands inside the
    next step rather than between two."""

    def __init__(self, command: list[str], after_steps: int, fraction: float):
        self.after_steps, self.fraction = after_steps, fraction
        self.sent = False
        self.stderr = ""
        self.stdout = b""
        self.process = subprocess.Popen(command, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self._reader = threading.Thread(target=self._watch, daemon=True)
        self._reader.start()

    def _watch(self) -> None:
        fd = self.process.stderr.fileno()
        shown: dict[int, float] = {}  # completed steps -> when the bar first showed them
        while chunk := os.read(fd, 4096):
            now = time.monotonic()
            self.stderr += chunk.decode(errors="replace")
            for value in re.findall(rf"\b(\d+)/{STEPS}\b", chunk.decode(errors="replace")):
                shown.setdefault(int(value), now)
            if not self.sent and max(shown, default=-1) >= self.after_steps and len(shown) >= 2:
                first, last = min(shown), max(shown)
                step_seconds = (shown[last] - shown[first]) / (last - first)
                time.sleep(self.fraction * step_seconds)
                self.process.send_signal(signal.SIGINT)
                self.sent = True

    def wait(self) -> int:
        self.stdout = self.process.stdout.read()
        code = self.process.wait(timeout=600)
        self._reader.join(timeout=60)
        return code


def test_ctrl_c_then_resume_gives_the_uninterrupted_weights(tmp_path: Path) -> None:
    from pasam_hf.cli import main

    model = save_tiny_model(tmp_path / "model")
    data = write_folder(tmp_path / "data", shape_records(6))
    # Early in the first epoch, in the middle of the second, past the point-mining switch: wherever the signal lands
    # in the step (forward, optimizer update, data loading), the saved state must be that of a completed step.
    moments = {1: 0.5, 4: 0.7, 8: 0.85}  # after k steps, that fraction of a step later
    runs = {k: Interrupted(_command(model, data, tmp_path / f"stopped_{k}"), k, fraction) for k, fraction in moments.items()}
    # Meanwhile the same command uninterrupted, and later the resumed ones, run in this process (same thread count).
    assert main(_command(model, data, tmp_path / "straight", "--no-progress")[3:]) == 0
    for k, run in runs.items():
        code = run.wait()
        assert run.sent, (k, run.stderr[-3000:])
        assert code == 130, (k, code, run.stderr[-3000:])
        assert b"interrupted: progress saved to" in run.stdout, (k, run.stdout[-2000:])
        [checkpoint] = (tmp_path / f"stopped_{k}" / "checkpoints").glob("step_*")
        state = json.loads((checkpoint / "trainer_state.json").read_text())
        # The state counts exactly the batches whose optimizer step is in the saved weights.
        assert k <= state["global_step"] < STEPS, (k, state)
        assert state["global_step"] == state["epoch"] * BATCHES_PER_EPOCH + state["batches_in_epoch"], state

    expected = load_file(tmp_path / "straight" / "model.safetensors")
    for k in moments:
        assert main(_command(model, data, tmp_path / f"stopped_{k}", "--no-progress", "--resume")[3:]) == 0
        actual = load_file(tmp_path / f"stopped_{k}" / "model.safetensors")
        assert actual.keys() == expected.keys()
        different = [name for name in expected if not torch.equal(expected[name], actual[name])]
        assert not different, (k, different[:5])


def test_resume_refuses_a_checkpoint_of_another_run(tmp_path: Path, capsys) -> None:
    from conftest import tiny_config
    from test_training import run_args

    from pasam_hf import PASamModel
    from pasam_hf.cli import main
    from pasam_hf.training import CheckpointError, train

    data = write_folder(tmp_path / "data", shape_records(4))
    other = write_folder(tmp_path / "other", shape_records(6, seed=1))
    model_dir = save_tiny_model(tmp_path / "model")
    common = ["--model", str(model_dir), "--output-dir", str(tmp_path / "cli"), "--batch-size", "2", "--report-to",
              "none", "--no-progress", "--max-instances-per-image", "1"]
    assert main(["train", *common, "--data", str(data), "--max-steps", "2"]) == 0
    run = tmp_path / "cli"

    def resume(model=None, **overrides):
        args = run_args(run, data=str(data), max_steps=3, resume="latest", max_instances_per_image=1)
        args = run_args(run, **{**vars(args), "output_dir": str(run), **overrides})
        return train(args, model=model or PASamModel.from_pretrained(model_dir))

    encoder_changed = PASamModel.from_pretrained(model_dir)
    with torch.no_grad():
        next(encoder_changed.vision_encoder.parameters()).view(-1)[0] += 1e-3
    torch.manual_seed(0)
    other_config = PASamModel(tiny_config(edge_mode="rgb"))
    refused = {
        r"another model \(the image encoder weights differ\)": dict(model=encoder_changed),
        r"another model configuration \(mask_decoder_config.edge_mode 'official' there, 'rgb' here\)":
            dict(model=other_config),
        r"--batch-size 2 there, 1 here": dict(batch_size=1),
        r"other training data \(4 samples of .*data there, 6 samples of .*other here\)": dict(data=str(other)),
        r"--learning-rate 0.001 there, 0.01 here": dict(learning_rate=1e-2),
    }
    for message, change in refused.items():
        with pytest.raises(CheckpointError, match=r"step_00000002 was saved by another run: " + message):
            resume(**change)
    # The command line says it in one line.
    assert main(["train", *common, "--data", str(other), "--max-steps", "3", "--resume"]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("pasam train: error:")]
    assert len(errors) == 1 and "was saved by another run: other training data" in errors[0], errors

    # Allowed: training further (--max-steps, --num-epochs), other logging, checkpointing and workers, and the same
    # data moved to another folder.
    data.rename(tmp_path / "moved")
    result = resume(data=str(tmp_path / "moved"), num_epochs=30, log_every=1, checkpoint_every=7, keep_checkpoints=3)
    assert result.global_step == 3


class InterruptingRecords(RecordSequence):
    """Training records (random access, as a folder's) that press Ctrl-C (SIGINT to this process) while the `at`-th
    record is being loaded, as a user would at any moment; loading goes on (the signal only asks the loop to stop)."""

    def __init__(self, records, at: int, times: int = 1, signum: int = signal.SIGINT):
        self.records, self.at, self.times, self.loads = list(records), at, times, 0
        self.signum = signum

    def __len__(self) -> int:
        return len(self.records)

    def sample_name(self, index: int) -> str:
        return self.records[index].name

    def __getitem__(self, index):
        self.loads += 1
        if self.loads == self.at:
            for _ in range(self.times):
                os.kill(os.getpid(), self.signum)
        return self.records[index]


@pytest.mark.parametrize(
    "at, times, signum",
    [(3, 1, signal.SIGINT), (6, 1, signal.SIGINT), (3, 2, signal.SIGINT), (3, 1, signal.SIGTERM)],
    ids=["inside-an-accumulated-step", "between-steps", "delivered-twice", "sigterm"],
)
def test_ctrl_c_with_gradient_accumulation_finishes_the_step(tmp_path: Path, at: int, times: int, signum) -> None:
    """With 2 batches per optimizer step, Ctrl-C inside a step: the step's second batch is still trained, then the
    run stops; Ctrl-C between steps: the next step does not start. Either way the resumed run gives the weights of
    the uninterrupted one. The same Ctrl-C delivered twice at once (`accelerate launch` forwards the terminal's
    SIGINT to its processes, which got it already) is one Ctrl-C, not a "stop at once". SIGTERM (`kill`, a
    scheduler pre-empting the job) is handled as Ctrl-C: without it the process would die mid-step, unsaved."""
    from test_training import run_args, tiny_model, trained_state

    from pasam_hf.training import train

    records = shape_records(6)
    settings = dict(batch_size=1, gradient_accumulation_steps=2, max_steps=6, checkpoint_every=100)
    straight = tiny_model()
    train(run_args(tmp_path / "straight", **settings), model=straight, train_records=records)
    with pytest.raises(KeyboardInterrupt):
        stopping = InterruptingRecords(records, at, times, signum)
        train(run_args(tmp_path / "stopped", **settings), model=tiny_model(), train_records=stopping)
    [checkpoint] = (tmp_path / "stopped" / "run" / "checkpoints").glob("step_*")
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    # Batch size 1, and Accelerate reads one batch ahead: record `at` loads while batch `at - 1` is handed over. At 3
    # that is the second batch of step 1, which completes; at 6 it is the first of step 3, which is not started.
    assert state["global_step"] == (at - 1) // 2 and state["batches_in_epoch"] == 2 * state["global_step"], state
    resumed = tiny_model()
    result = train(run_args(tmp_path / "stopped", resume="latest", **settings), model=resumed, train_records=records)
    assert result.global_step == 6
    expected, actual = trained_state(straight), trained_state(resumed)
    assert all(torch.equal(expected[name], actual[name]) for name in expected)


@pytest.mark.heavy
def test_ctrl_c_under_accelerate_launch_resumes_exactly(tmp_path: Path) -> None:
    """Two DDP processes (CPU, gloo) started by `accelerate launch`; Ctrl-C reaches the whole process group, as from a
    terminal, and the launcher forwards it once more: both processes finish the step, save one checkpoint and stop;
    the resumed run equals the uninterrupted one."""
    import socket

    model = save_tiny_model(tmp_path / "model")
    data = write_folder(tmp_path / "data", shape_records(6))
    env = dict(subprocess_env(), ACCELERATE_USE_CPU="1")

    def launch(output_dir: Path, *extra: str, **popen) -> subprocess.Popen:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = str(probe.getsockname()[1])
        command = [
            sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", port,
            *_command(model, data, output_dir, "--batch-size", "1", *extra)[1:],
        ]
        return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, **popen)

    stopped = launch(tmp_path / "stopped", start_new_session=True)
    seen = b""
    while chunk := os.read(stopped.stderr.fileno(), 4096):
        seen += chunk
        if max((int(value) for value in re.findall(rb"\b(\d+)/%d\b" % STEPS, seen)), default=0) >= 3:
            os.killpg(stopped.pid, signal.SIGINT)
            break
    out, err = stopped.communicate(timeout=600)
    assert stopped.returncode == 130, (seen + err).decode(errors="replace")[-3000:]
    assert out.count(b"interrupted: progress saved to") == 1, out
    [checkpoint] = (tmp_path / "stopped" / "checkpoints").glob("step_*")
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    assert state["global_step"] == state["epoch"] * 3 + state["batches_in_epoch"], state  # 6 images, 2 x batch 1

    runs = [launch(tmp_path / "stopped", "--no-progress", "--resume"), launch(tmp_path / "straight", "--no-progress")]
    for run in runs:
        _, err = run.communicate(timeout=600)
        assert run.returncode == 0, err.decode(errors="replace")[-3000:]
    expected = load_file(tmp_path / "straight" / "model.safetensors")
    actual = load_file(tmp_path / "stopped" / "model.safetensors")
    assert all(torch.equal(expected[name], actual[name]) for name in expected)
