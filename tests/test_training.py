"""Fine-tuning: the loss goes down, resume is exact, non-finite losses are skipped then stop the run, checkpoints
survive a kill during a save, bad files are reported, 2-process `accelerate launch` works, the embedding cache."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pasam_hf import PASamModel, PASamProcessor
from pasam_hf.data import SegmentationRecord
from pasam_hf.training import (
    CheckpointError,
    TrainingArguments,
    TrainingDivergedError,
    build_embedding_cache,
    mark_trainable,
    train,
)
from pasam_hf.training.cache import EmbeddingCacheError

from conftest import tiny_config

REPO = Path(__file__).resolve().parents[1]


def shape_records(count: int = 8, seed: int = 0) -> list[SegmentationRecord]:
    """Bright discs and bars on a darker textured background: easy to learn, exact masks."""
    rng = np.random.default_rng(seed)
    records = []
    for index in range(count):
        height, width = 96, 128
        image = rng.integers(0, 90, (height, width, 3), dtype=np.uint8)
        yy, xx = np.mgrid[:height, :width]
        cy, cx, r = rng.integers(25, 70), rng.integers(30, 100), rng.integers(10, 22)
        mask = ((yy - cy) ** 2 + (xx - cx) ** 2) <= r**2
        if index % 2:
            mask |= (np.abs(yy - rng.integers(10, 86)) < 3) & (xx > 10) & (xx < 118)
        image[mask] = np.clip(image[mask].astype(int) + 140, 0, 255).astype(np.uint8)
        records.append(SegmentationRecord(f"shape_{index}", Image.fromarray(image), mask[None].astype(np.uint8)))
    return records


def tiny_model(seed: int = 0) -> PASamModel:
    torch.manual_seed(seed)
    return PASamModel(tiny_config())


def run_args(tmp_path: Path, **overrides) -> TrainingArguments:
    settings = dict(
        output_dir=str(tmp_path / "run"),
        data="in-memory",
        batch_size=2,
        num_epochs=50,
        max_steps=6,
        learning_rate=1e-3,
        checkpoint_every=100,
        report_to="none",
        progress=False,
        point_mining_warmup_epochs=1,
        max_instances_per_image=2,
    )
    settings.update(overrides)
    return TrainingArguments(**settings)


def trained_state(model: PASamModel) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}


def test_trainable_set_is_the_release_one() -> None:
    model = tiny_model()
    names = mark_trainable(model)
    assert all(name.startswith("mask_decoder.") for name in names)
    assert any(n.startswith("mask_decoder.guiding_conv.") for n in names)
    assert any(n.startswith("mask_decoder.prompt_adapter.") for n in names)
    assert "mask_decoder.mask_tokens.weight" in names
    assert any(n.startswith("mask_decoder.upscale_conv1.") for n in names)
    assert any(n.startswith("mask_decoder.output_hypernetworks_mlps.0.") for n in names)
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    assert any(n.startswith("vision_encoder.") for n in frozen)
    assert any(n.startswith("prompt_encoder.") for n in frozen)
    assert any(n.startswith("mask_decoder.transformer.") for n in frozen)
    assert any(n.startswith("mask_decoder.iou_prediction_head.") for n in frozen)


def test_loss_goes_down_and_model_is_saved(tmp_path: Path) -> None:
    model = tiny_model()
    frozen_before = {n: p.detach().clone() for n, p in model.named_parameters() if n.startswith("vision_encoder.")}
    args = run_args(tmp_path, max_steps=40, augment=False, learning_rate=3e-3)
    result = train(args, model=model, train_records=shape_records())
    assert len(result.losses) == 40 and all(np.isfinite(result.losses))
    assert np.mean(result.losses[-8:]) < 0.8 * np.mean(result.losses[:8])
    for name, before in frozen_before.items():
        assert torch.equal(dict(model.named_parameters())[name], before), f"{name} moved but is frozen"
    # The run's output loads as a model and as an adapter on top of the same trunk.
    reloaded = PASamModel.from_pretrained(args.output_dir)
    for name, tensor in reloaded.state_dict().items():
        assert torch.equal(tensor, model.state_dict()[name]), name
    assert (Path(args.output_dir) / "adapter").is_dir()
    PASamProcessor.from_pretrained(args.output_dir)


def test_resume_is_exact(tmp_path: Path) -> None:
    """Stopping after 3 steps (mid-epoch) and resuming to 7 gives the weights of an uninterrupted 7-step run."""
    records = shape_records()
    straight = tiny_model()
    train(run_args(tmp_path / "a", max_steps=7, checkpoint_every=3), model=straight, train_records=records)

    first = tiny_model()
    train(run_args(tmp_path / "b", max_steps=3, checkpoint_every=3), model=first, train_records=records)
    resumed = tiny_model()  # fresh process state: only the checkpoint carries the progress
    result = train(
        run_args(tmp_path / "b", max_steps=7, checkpoint_every=3, resume="latest"), model=resumed, train_records=records
    )
    assert result.global_step == 7
    expected, actual = trained_state(straight), trained_state(resumed)
    for name in expected:
        assert torch.equal(expected[name], actual[name]), name


def test_nonfinite_loss_is_skipped_then_stops(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    records = shape_records()
    calls = {"n": 0}
    forward = PASamModel.forward

    def poisoned(self, *args, **kwargs):
        outputs = forward(self, *args, **kwargs)
        calls["n"] += 1
        if calls["n"] in poisoned.bad_calls:
            outputs.loss = outputs.loss * float("nan")
        return outputs

    poisoned.bad_calls = {2}
    monkeypatch.setattr(PASamModel, "forward", poisoned)
    model = tiny_model()
    result = train(run_args(tmp_path / "skip", max_steps=4), model=model, train_records=records)
    assert result.nonfinite_steps == 1 and result.global_step == 4
    assert all(torch.isfinite(p).all() for p in model.parameters())

    calls["n"] = 0
    poisoned.bad_calls = set(range(4, 100))
    args = run_args(tmp_path / "stop", max_steps=20, checkpoint_every=2, max_nonfinite_steps=3)
    with pytest.raises(TrainingDivergedError, match="3 steps in a row"):
        train(args, model=tiny_model(), train_records=records)
    checkpoints = sorted((Path(args.output_dir) / "checkpoints").glob("step_*"))
    assert [p.name for p in checkpoints] == ["step_00000002"]
    state = json.loads((checkpoints[-1] / "trainer_state.json").read_text())
    assert state["global_step"] == 2


KILL_SCRIPT = textwrap.dedent(
    """
    import os, signal, sys
    import safetensors.torch
    sys.path.insert(0, {tests!r})
    from test_training import run_args, shape_records, tiny_model
    from pasam_hf.training import train
    from pathlib import Path

    saves = {{"n": 0}}
    original = safetensors.torch.save_file

    def save_then_die(tensors, filename, *args, **kwargs):
        saves["n"] += 1
        if saves["n"] == {kill_at}:
            # Half a checkpoint on disk, then the process dies as if killed by the OOM killer or a pre-emption.
            with open(filename, "wb") as handle:
                handle.write(b"partial")
            os.kill(os.getpid(), signal.SIGKILL)
        return original(tensors, filename, *args, **kwargs)

    safetensors.torch.save_file = save_then_die
    # Accelerate writes the model state through its own alias of safetensors' save_file.
    import accelerate.utils.other
    accelerate.utils.other.safe_save_file = save_then_die
    train(run_args(Path({tmp!r}), max_steps=6, checkpoint_every=2), model=tiny_model(), train_records=shape_records())
    """
)


def test_kill_during_checkpoint_keeps_previous_and_resumes_exactly(tmp_path: Path) -> None:
    script = tmp_path / "kill.py"
    # The 2nd safetensors write is the 2nd checkpoint's model file (step 4).
    script.write_text(KILL_SCRIPT.format(tests=str(REPO / "tests"), kill_at=2, tmp=str(tmp_path / "killed")))
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"))
    process = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=300)
    assert process.returncode == -9, process.stderr[-2000:]
    checkpoint_dir = tmp_path / "killed" / "run" / "checkpoints"
    names = sorted(p.name for p in checkpoint_dir.iterdir())
    assert names == [".incomplete-step_00000004", "step_00000002"], names

    records = shape_records()
    resumed = tiny_model()
    result = train(
        run_args(tmp_path / "killed", max_steps=6, checkpoint_every=2, resume="latest"),
        model=resumed,
        train_records=records,
    )
    assert result.global_step == 6
    assert not (checkpoint_dir / ".incomplete-step_00000004").exists()
    straight = tiny_model()
    train(run_args(tmp_path / "straight", max_steps=6, checkpoint_every=2), model=straight, train_records=records)
    expected, actual = trained_state(straight), trained_state(resumed)
    for name in expected:
        assert torch.equal(expected[name], actual[name]), name


def test_resume_errors_are_clear(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="no complete checkpoint"):
        train(run_args(tmp_path, resume="latest"), model=tiny_model(), train_records=shape_records())
    with pytest.raises(CheckpointError, match="not a complete checkpoint"):
        train(run_args(tmp_path, resume=str(tmp_path)), model=tiny_model(), train_records=shape_records())
    with pytest.raises(ValueError, match="--batch-size must be >= 1"):
        run_args(tmp_path, batch_size=0)
    # In Python the model is an argument, not a flag.
    with pytest.raises(ValueError, match=r"no model to fine-tune: pass train\(model=\.\.\.\), or TrainingArguments"):
        train(run_args(tmp_path / "no-model"), train_records=shape_records(2))


def test_embedding_cache_trains_the_same_decoder(tmp_path: Path) -> None:
    model = tiny_model()
    processor = PASamProcessor.from_model_config(model.config)
    records = shape_records(4)
    cache = build_embedding_cache(model, processor, records, tmp_path / "cache", views_per_image=2, progress=False)
    index = json.loads((cache / "cache.json").read_text())
    assert len(index["entries"]) == 8
    args = run_args(tmp_path, data=None, embedding_cache=str(cache), max_steps=20, learning_rate=3e-3)
    result = train(args, model=model)
    assert np.mean(result.losses[-5:]) < np.mean(result.losses[:5])
    with pytest.raises(EmbeddingCacheError, match="already holds"):
        build_embedding_cache(model, processor, records, cache, progress=False)
    with pytest.raises(EmbeddingCacheError, match="another image encoder"):
        train(run_args(tmp_path / "other", data=None, embedding_cache=str(cache)), model=tiny_model(seed=1))


# ------------------------------------------------------------------------------------------------------------------
# Real photos, the CLI, several processes, bad files, mixed precision, logging, the Hub, point mining.
# ------------------------------------------------------------------------------------------------------------------


@pytest.fixture
def fresh_accelerate_state():
    """Accelerate keeps one process-wide state whose mixed precision cannot change: reset it around a test that
    uses another precision than the rest of the session."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


def write_folder(root: Path, records: list[SegmentationRecord]) -> Path:
    """`images/` + `masks/` (0 / 255 PNGs) of `records`."""
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for record in records:
        record.image.save(root / "images" / f"{record.name}.png")
        Image.fromarray(record.instances[0] * 255).save(root / "masks" / f"{record.name}.png")
    return root


def write_corrupt_pair(root: Path, stem: str) -> None:
    (root / "images" / f"{stem}.png").write_bytes(b"\x89PNG\r\n\x1a\n this file was cut short")
    Image.fromarray(np.full((96, 128), 255, np.uint8)).save(root / "masks" / f"{stem}.png")


def save_tiny_model(directory: Path) -> Path:
    model = tiny_model()
    model.save_pretrained(directory)
    PASamProcessor.from_model_config(model.config).save_pretrained(directory)
    return directory


def subprocess_env() -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=str(REPO / "src"), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")


def test_hq_fixture_loss_goes_down(hq_fixture: list[dict], tmp_path: Path) -> None:
    from pasam_hf.data import load_records

    records = load_records(Path(hq_fixture[0]["image"]).parents[1])
    assert len(records) == 8
    args = run_args(
        tmp_path, max_steps=24, batch_size=4, augment=False, learning_rate=3e-3, prompt_preset="hq-sam", seed=0
    )
    result = train(args, model=tiny_model(), train_records=records)
    assert len(result.losses) == 24 and all(np.isfinite(result.losses)) and result.bad_samples == []
    assert np.mean(result.losses[-6:]) < 0.85 * np.mean(result.losses[:6]), result.losses


def test_corrupt_file_is_skipped_and_reported_then_too_many_abort(tmp_path: Path, capsys) -> None:
    data = write_folder(tmp_path / "data", shape_records(10))
    write_corrupt_pair(data, "broken_scan")
    # 11 samples, 2 per batch: 6 batches an epoch, one of them holds the broken file.
    args = run_args(tmp_path / "ok", data=str(data), max_steps=8, max_bad_fraction=0.2)
    result = train(args, model=tiny_model())
    assert result.global_step == 8 and result.epochs_completed == 1
    out = capsys.readouterr().out
    assert "epoch 0: skipped 1 of 11 samples that could not be used: broken_scan (" in out
    assert "broken_scan.png" in out  # the reason names the file
    assert [sample["name"] for sample in result.bad_samples] == ["broken_scan"]
    assert result.bad_samples[0]["kind"] == "image"

    # 1 of 11 is above the default 10%: the exact end-of-epoch count stops the run, naming the file.
    from pasam_hf.data import DataQualityError

    strict = r"1 of 11 training samples \(9\.1%\).*max_bad_fraction=0.05.*broken_scan"
    with pytest.raises(DataQualityError, match=strict):
        train(run_args(tmp_path / "strict", data=str(data), max_steps=50, max_bad_fraction=0.05), model=tiny_model())
    for stem in ("a", "b", "c"):
        write_corrupt_pair(data, f"broken_{stem}")
    too_many = r"4 of 14 training samples \(28\.6%\).*max_bad_fraction=0.1 .*First: .*broken_a \("
    with pytest.raises(DataQualityError, match=too_many):
        train(run_args(tmp_path / "abort", data=str(data), max_steps=50), model=tiny_model())


def test_batch_of_only_bad_samples_is_not_a_step(tmp_path: Path) -> None:
    data = write_folder(tmp_path / "data", shape_records(4))
    write_corrupt_pair(data, "broken")
    args = run_args(
        tmp_path, data=str(data), batch_size=1, max_steps=None, num_epochs=2, max_bad_fraction=0.3, augment=False
    )
    result = train(args, model=tiny_model())
    # 5 batches an epoch, 4 usable: two epochs are 8 optimizer steps, none with a made-up zero loss.
    assert result.global_step == 8 and result.epochs_completed == 2
    assert len(result.losses) == 8 and min(result.losses) > 0.05


def test_streamed_records_train(tmp_path: Path) -> None:
    import datasets

    from pasam_hf.data import IterableRecords, load_records

    records = shape_records(4)
    dataset = datasets.Dataset.from_dict(
        {"image": [r.image for r in records], "mask": [Image.fromarray(r.instances[0] * 255) for r in records]}
    )
    stream = load_records(dataset.to_iterable_dataset())
    assert isinstance(stream, IterableRecords)
    result = train(run_args(tmp_path, steps_per_epoch=2, max_steps=3), model=tiny_model(), train_records=stream)
    assert result.global_step == 3 and result.epochs_completed == 1
    with pytest.raises(ValueError, match="--steps-per-epoch"):
        train(run_args(tmp_path / "b", max_steps=None, num_epochs=1), model=tiny_model(), train_records=stream)


def test_point_mining_switches_on_after_warmup(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seen = []
    forward = PASamModel.forward

    def recording(self, *args, **kwargs):
        outputs = forward(self, *args, **kwargs)
        seen.append((self.training, outputs.mined_point_labels is not None))
        return outputs

    monkeypatch.setattr(PASamModel, "forward", recording)
    model = tiny_model()
    # 4 records, 2 per batch: steps 1-2 are epoch 0 (warm-up), steps 3-6 epochs 1-2.
    train(run_args(tmp_path, max_steps=6, point_mining_warmup_epochs=1), model=model, train_records=shape_records(4))
    assert seen == [(True, False)] * 2 + [(True, True)] * 4
    assert model.config.mask_decoder_config.point_mining_in_training
    seen.clear()
    never = run_args(tmp_path / "never", max_steps=2, point_mining_warmup_epochs=5)
    train(never, model=tiny_model(), train_records=shape_records(4))
    assert seen == [(True, False)] * 2


def test_bf16_on_cpu_and_fp16_refused_without_gpu(tmp_path: Path, fresh_accelerate_state) -> None:
    model = tiny_model()
    args = run_args(tmp_path, max_steps=2, mixed_precision="bf16")
    result = train(args, model=model, train_records=shape_records(4))
    assert len(result.losses) == 2 and all(np.isfinite(result.losses))
    # Autocast, not bf16 weights: every parameter (the LayerNorms included) stays float32.
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    if torch.cuda.is_available():
        pytest.skip("fp16 refusal is for machines without a GPU")
    # Accelerate would silently train in fp32: the run refuses instead.
    with pytest.raises(ValueError, match="--mixed-precision fp16 is not available on cpu.*fp16 needs a GPU.*bf16"):
        train(run_args(tmp_path / "fp16", mixed_precision="fp16"), model=tiny_model(), train_records=shape_records(4))


def test_tensorboard_logs(tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    args = run_args(tmp_path, max_steps=3, report_to="tensorboard", log_every=1)
    train(args, model=tiny_model(), train_records=shape_records(4))
    events = sorted((Path(args.output_dir) / "logs").rglob("events.out.tfevents.*"))
    assert events, list((Path(args.output_dir) / "logs").rglob("*"))
    tags = set()
    for event_file in events:
        accumulator = EventAccumulator(str(event_file))
        accumulator.Reload()
        tags |= set(accumulator.Tags()["scalars"])
        if "train/loss" in accumulator.Tags()["scalars"]:
            assert [event.step for event in accumulator.Scalars("train/loss")] == [1, 2, 3]
    assert {"train/loss", "train/lr"} <= tags


def test_push_to_hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub

    from pasam_hf.training import HubUploadError

    calls = []

    class FakeApi:
        def create_repo(self, repo_id, **kwargs):
            calls.append(("create_repo", repo_id, kwargs))

        def create_branch(self, repo_id, **kwargs):
            calls.append(("create_branch", repo_id, kwargs))

        def upload_folder(self, **kwargs):
            calls.append(("upload_folder", kwargs.pop("repo_id"), kwargs))
            files = sorted(p.name for p in Path(kwargs["folder_path"]).iterdir())
            assert {"config.json", "model.safetensors", "processor_config.json", "adapter"} <= set(files)
            return "https://huggingface.co/me/pasam-shapes/commit/123"

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    args = run_args(tmp_path, max_steps=1, push_to_hub="me/pasam-shapes", hub_private=True, hub_revision="v1")
    train(args, model=tiny_model(), train_records=shape_records(2))
    assert [call[:2] for call in calls] == [
        ("create_repo", "me/pasam-shapes"),
        ("create_branch", "me/pasam-shapes"),
        ("upload_folder", "me/pasam-shapes"),
    ]
    assert calls[0][2] == {"private": True, "exist_ok": True}
    assert calls[1][2]["branch"] == "v1"
    upload = calls[2][2]
    assert upload["folder_path"] == args.output_dir and upload["revision"] == "v1"
    assert set(upload["ignore_patterns"]) == {"checkpoints/*", "logs/*"}

    class OfflineApi(FakeApi):
        def upload_folder(self, **kwargs):
            raise ConnectionError("Failed to resolve 'huggingface.co'")

    monkeypatch.setattr(huggingface_hub, "HfApi", OfflineApi)
    failing = run_args(tmp_path / "offline", max_steps=1, push_to_hub="me/pasam-shapes")
    with pytest.raises(HubUploadError, match=r"saved in .*offline/run, but uploading it to .*'me/pasam-shapes' failed "
                       r"\(ConnectionError: Failed to resolve.*hf upload me/pasam-shapes"):
        train(failing, model=tiny_model(), train_records=shape_records(2))
    assert (Path(failing.output_dir) / "model.safetensors").is_file()  # nothing learnt is lost


def test_processes_that_do_not_see_each_other_are_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # What `accelerate launch --multi_gpu --num_processes 2` without a GPU and without ACCELERATE_USE_CPU gives.
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match="2 processes were launched but Accelerate runs each one alone.*USE_CPU=1"):
        train(run_args(tmp_path), model=tiny_model(), train_records=shape_records(2))


def _run_cli(args: list[str], cwd: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "pasam_hf", "train", *args],
        cwd=cwd, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


def test_train_cli_subprocess(tmp_path: Path) -> None:
    model_dir = save_tiny_model(tmp_path / "model")
    data = write_folder(tmp_path / "data", shape_records(4))
    common = ["--batch-size", "2", "--report-to", "none", "--no-progress", "--max-instances-per-image", "1"]
    # The success and the three error paths run side by side: each subprocess mostly waits on imports.
    runs = {
        "ok": _run_cli(["--model", str(model_dir), "--data", str(data), "--output-dir", "out", "--max-steps", "2",
                        *common], tmp_path),
        "no model": _run_cli(["--data", str(data), "--output-dir", "out2", "--resume"], tmp_path),
        "missing data": _run_cli(["--model", str(model_dir), "--data", str(tmp_path / "nowhere" / "train"),
                                  "--output-dir", "out3", *common], tmp_path),
        "no checkpoint": _run_cli(["--model", str(model_dir), "--data", str(data), "--output-dir", "out4",
                                   "--resume", *common], tmp_path),
    }
    results = {name: (process.wait(timeout=300), *process.communicate()) for name, process in runs.items()}
    code, out, err = results["ok"]
    assert code == 0, err[-3000:]
    assert "final loss" in out and "after 2 steps" in out
    PASamModel.from_pretrained(tmp_path / "out")
    expected = {
        "no model": "no model to fine-tune: pass --model",
        "missing data": "does not exist; check the path",
        "no checkpoint": "--resume: no complete checkpoint in",
    }
    for name, message in expected.items():
        code, out, err = results[name]
        assert code == 2, (name, err[-3000:])
        errors = [line for line in err.splitlines() if line.startswith("pasam train: error:")]
        assert len(errors) == 1 and message in errors[0], (name, err[-3000:])
        assert "Traceback" not in err


def test_two_processes_with_accelerate_launch_and_resume(tmp_path: Path) -> None:
    """DDP on CPU (gloo): Accelerate 1.15 runs several CPU processes with `--multi_gpu` + ACCELERATE_USE_CPU=1
    (`--cpu --num_processes 2` launches a single process). A broken file gives one process a batch with nothing
    to train on: both processes must skip that step together, or the gradient all-reduce would hang."""
    import socket

    model_dir = save_tiny_model(tmp_path / "model")
    data = write_folder(tmp_path / "data", shape_records(10))
    write_corrupt_pair(data, "broken")
    with socket.socket() as probe:  # a free port: other runs may hold Accelerate's default 29500
        probe.bind(("127.0.0.1", 0))
        port = str(probe.getsockname()[1])
    env = dict(subprocess_env(), ACCELERATE_USE_CPU="1")

    def launch(script: list[str], max_steps: int, *extra: str) -> subprocess.CompletedProcess:
        command = [
            sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", port,
            *script, "--model", str(model_dir), "--data", str(data), "--output-dir", str(tmp_path / "run"),
            "--batch-size", "1", "--max-steps", str(max_steps), "--checkpoint-every", "3", "--report-to", "none",
            "--no-progress", "--max-instances-per-image", "1", "--max-bad-fraction", "0.2", *extra,
        ]
        return subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=400)

    # 11 samples on 2 processes: 6 batches each an epoch (Accelerate repeats one sample to even them out, which
    # is not counted as a sample again), one of them broken.
    first = launch([str(REPO / "examples" / "finetune.py")], 7)
    assert first.returncode == 0, first.stderr[-4000:]
    assert "7 steps, final loss" in first.stdout
    assert "epoch 0: skipped 1 of 11 samples that could not be used: broken (" in first.stdout
    assert first.stdout.count("broken (image of broken") == 1  # listed once
    state = json.loads((tmp_path / "run" / "checkpoints" / "step_00000007" / "trainer_state.json").read_text())
    assert state["global_step"] == 7 and state["epoch"] == 1 and state["bad_samples"] == 1
    first_weights = PASamModel.from_pretrained(tmp_path / "run").state_dict()

    second = launch(["-m", "pasam_hf", "train"], 9, "--resume")
    assert second.returncode == 0, second.stderr[-4000:]
    assert "resumed from" in second.stdout and "step 7" in second.stdout
    assert "after 9 steps" in second.stdout
    resumed = PASamModel.from_pretrained(tmp_path / "run").state_dict()
    assert any(not torch.equal(resumed[name], first_weights[name]) for name in first_weights)


def write_bad_pairs(root: Path) -> list[str]:
    """Three pairs that cannot be used: a truncated image, a mask of another size than its image, an empty mask."""
    write_corrupt_pair(root, "broken_scan")
    image = Image.fromarray(np.full((96, 128, 3), 90, np.uint8))
    image.save(root / "images" / "wrong_size.png")
    Image.fromarray(np.full((48, 64), 255, np.uint8)).save(root / "masks" / "wrong_size.png")
    image.save(root / "images" / "no_object.png")
    Image.fromarray(np.zeros((96, 128), np.uint8)).save(root / "masks" / "no_object.png")
    return ["broken_scan", "no_object", "wrong_size"]


def _run_pasam(args: list[str], cwd: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "pasam_hf", *args],
        cwd=cwd, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


def test_cache_cli_reports_bad_samples_applies_the_rule_and_training_reports_them(tmp_path: Path, capsys) -> None:
    from pasam_hf.data import DataQualityError

    model_dir = save_tiny_model(tmp_path / "model")
    data = write_folder(tmp_path / "data", shape_records(9))
    bad = write_bad_pairs(data)  # 3 of 12 samples: 25%
    common = ["--data", str(data), "--model", str(model_dir), "--views", "1", "--device", "cpu"]
    runs = {
        "tolerant": _run_pasam(["cache", *common, "--out", "lenient", "--max-bad-fraction", "0.3"], tmp_path),
        "default": _run_pasam(["cache", *common, "--out", "strict"], tmp_path),
    }
    results = {name: (process.wait(timeout=300), *process.communicate()) for name, process in runs.items()}

    code, out, err = results["tolerant"]
    assert code == 0, err[-3000:]
    assert "skipped 3 of 12 samples that could not be used" in out
    assert "Loading weights" not in err  # transformers' bars are not the command's progress
    # Each bad sample on its own line, with its reason.
    lines = {line.split(":")[0].strip(): line for line in out.splitlines() if line.startswith("  ")}
    assert sorted(lines) == bad, out
    assert "cannot be read as an image" in lines["broken_scan"]
    assert "is 64x48 (WxH) but its image is 128x96" in lines["wrong_size"]
    assert "no foreground" in lines["no_object"]

    # The training rule (10% by default) applies to the cache too: nothing is written.
    code, out, err = results["default"]
    assert code == 2, err[-3000:]
    errors = [line for line in err.splitlines() if line.startswith("pasam cache: error:")]
    assert len(errors) == 1 and "3 of 12 training samples (25.0%) could not be used" in errors[0], err
    assert "Traceback" not in err
    assert not (tmp_path / "strict").exists() and not (tmp_path / "strict.incomplete").exists()

    # Training from the cache reports the samples it lacks, as training on the folder would.
    cache = str(tmp_path / "lenient")
    model = str(model_dir)
    args = run_args(tmp_path / "run", model=model, data=None, embedding_cache=cache, max_steps=2, max_bad_fraction=0.3)
    result = train(args)
    assert sorted(sample["name"] for sample in result.bad_samples) == bad
    assert "left out 3 of 12 samples that could not be used" in capsys.readouterr().out
    with pytest.raises(DataQualityError, match=r"3 of 12 training samples \(25\.0%\)"):
        train(run_args(tmp_path / "run2", model=model, data=None, embedding_cache=cache, max_steps=2))
    with pytest.raises(DataQualityError, match=r"3 of 12 training samples \(25\.0%\)"):
        train(run_args(tmp_path / "run3", model=model, data=str(data), max_steps=None, num_epochs=1))


def test_failed_upload_prints_a_command_that_hf_upload_parses(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The recovery command is parsed by the installed `hf` CLI's own parser: one pattern per --exclude, the
    output directory (with a space in its path) as LOCAL_PATH, no stray PATH_IN_REPO."""
    import re
    import shlex

    import huggingface_hub
    from huggingface_hub.cli.hf import app

    from pasam_hf.training import HubUploadError

    class OfflineApi:
        def create_repo(self, repo_id, **kwargs):
            raise ConnectionError("Failed to resolve 'huggingface.co'")

    monkeypatch.setattr(huggingface_hub, "HfApi", OfflineApi)
    args = run_args(tmp_path / "my runs", max_steps=1, push_to_hub="me/pasam-shapes", hub_revision="v1",
                    hub_private=True)
    with pytest.raises(HubUploadError) as raised:
        train(args, model=tiny_model(), train_records=shape_records(2))
    command = re.search(r"upload it with `(hf upload [^`]+)`", str(raised.value)).group(1)
    words = shlex.split(command)
    assert words[:2] == ["hf", "upload"]
    # `hf`'s group resolves (and imports) the sub-command as `hf` itself does, then its parser reads the words.
    name, upload, rest = app.resolve_command(app.make_context("hf", words[1:]), words[1:])
    params = upload.make_context(name, rest).params
    assert params["repo_id"] == "me/pasam-shapes" and params["local_path"] == args.output_dir
    assert params["path_in_repo"] is None
    assert set(params["exclude"]) == {"checkpoints/*", "logs/*"}
    assert params["revision"] == "v1" and params["private"] is True


def test_failed_run_takes_back_only_what_it_created(tmp_path: Path) -> None:
    """A run stopped by the bad-sample rule before any checkpoint leaves no output directory holding only
    TensorBoard logs; in a directory that existed, the user's files stay."""
    from pasam_hf.data import DataQualityError

    data = write_folder(tmp_path / "data", shape_records(2))
    for stem in ("a", "b", "c"):
        write_corrupt_pair(data, f"broken_{stem}")
    new_dir = run_args(tmp_path / "new", data=str(data), max_steps=None, num_epochs=1, report_to="tensorboard")
    with pytest.raises(DataQualityError):
        train(new_dir, model=tiny_model())
    assert not Path(new_dir.output_dir).exists()

    existing = tmp_path / "existing" / "run"
    existing.mkdir(parents=True)
    (existing / "notes.txt").write_text("mine")
    args = run_args(tmp_path / "existing", data=str(data), max_steps=None, num_epochs=1, report_to="tensorboard")
    with pytest.raises(DataQualityError):
        train(args, model=tiny_model())
    assert sorted(path.name for path in existing.iterdir()) == ["notes.txt"]
