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
