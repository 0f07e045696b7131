"""What an epoch and a step are, as `pasam train --help` says: `--max-steps` overrides `--num-epochs`; a streamed
epoch is `--steps-per-epoch` steps; a cached epoch is one pass over the images; a wrong `--eval-data` and flags that
would be ignored stop the run before any training."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from test_training import run_args, save_tiny_model, shape_records, tiny_model, trained_state, write_folder

from pasam_hf import PASamProcessor
from pasam_hf.cli import main
from pasam_hf.training import EmbeddingCacheDataset, build_embedding_cache, train


def saved_dataset(directory: Path, count: int) -> Path:
    """A `datasets` dataset of `count` shape records, saved with save_to_disk (a DatasetDict with a train split)."""
    import datasets

    records = shape_records(count)
    dataset = datasets.Dataset.from_dict(
        {"image": [r.image for r in records], "mask": [Image.fromarray(r.instances[0] * 255) for r in records]}
    )
    datasets.DatasetDict(train=dataset).save_to_disk(str(directory))
    return directory


def test_max_steps_overrides_num_epochs(tmp_path: Path) -> None:
    data = write_folder(tmp_path / "data", shape_records(4))  # 2 batches an epoch
    result = train(run_args(tmp_path, data=str(data), num_epochs=1, max_steps=7), model=tiny_model())
    assert result.global_step == 7 and result.epochs_completed == 3
    assert len(result.losses) == 7


def test_streamed_epoch_is_steps_per_epoch(tmp_path: Path, capsys) -> None:
    data = saved_dataset(tmp_path / "stream", 4)  # one pass of the stream: 2 batches
    evaluation = write_folder(tmp_path / "eval", shape_records(1, seed=5))
    # Shorter than the stream: three epochs of one step, each evaluated, the state at epoch 3.
    short = run_args(tmp_path / "short", data=str(data), streaming=True, steps_per_epoch=1, max_steps=None,
                     num_epochs=3, eval_data=str(evaluation))
    result = train(short, model=tiny_model())
    assert result.global_step == 3 and result.epochs_completed == 3
    out = capsys.readouterr().out
    assert [line.split(" evaluation")[0] for line in out.splitlines() if " evaluation: " in line] == [
        "epoch 0", "epoch 1", "epoch 2"
    ]
    state = json.loads((Path(result.last_checkpoint) / "trainer_state.json").read_text())
    assert (state["epoch"], state["stream_pass"], state["batches_in_pass"]) == (3, 1, 1)
    # Longer than the stream: one epoch of 5 steps reads the stream 2.5 times.
    long = run_args(tmp_path / "long", data=str(data), streaming=True, steps_per_epoch=5, max_steps=None, num_epochs=1)
    result = train(long, model=tiny_model())
    assert result.global_step == 5 and result.epochs_completed == 1


def test_streamed_epochs_resume_exactly_across_passes(tmp_path: Path) -> None:
    """Stopped inside the second pass of the stream and inside an epoch of 3 steps, resumed: the weights of the
    uninterrupted run."""
    data = str(saved_dataset(tmp_path / "stream", 4))
    settings = dict(data=data, streaming=True, steps_per_epoch=3, point_mining_warmup_epochs=1, checkpoint_every=5)
    straight = tiny_model()
    train(run_args(tmp_path / "a", max_steps=8, **settings), model=straight)
    train(run_args(tmp_path / "b", max_steps=5, **settings), model=tiny_model())
    resumed = tiny_model()
    result = train(run_args(tmp_path / "b", max_steps=8, resume="latest", **settings), model=resumed)
    assert result.global_step == 8
    expected, actual = trained_state(straight), trained_state(resumed)
    assert all(torch.equal(expected[name], actual[name]) for name in expected)


def test_cached_epoch_is_one_pass_over_the_images(tmp_path: Path) -> None:
    model = tiny_model()
    processor = PASamProcessor.from_model_config(model.config)
    cache = build_embedding_cache(model, processor, shape_records(4), tmp_path / "cache", views_per_image=2,
                                  batch_size=2, progress=False)
    dataset = EmbeddingCacheDataset(cache)
    assert len(dataset) == 4
    index = json.loads((cache / "cache.json").read_text())
    for epoch in range(3):
        dataset.set_epoch(epoch)
        items = [dataset[i] for i in range(len(dataset))]
        assert sorted(item["name"] for item in items) == sorted(f"shape_{i}" for i in range(4))
        # Epoch e gives view e % 2: the augmentations an uncached run sees in its first epochs.
        expected_key = {e["name"]: e["key"] for e in index["entries"] if e["view"] == epoch % 2}
        from safetensors import safe_open

        for item in items:
            with safe_open(str(cache / "shard_00000.safetensors"), framework="pt") as handle:
                stored = handle.get_tensor(f"{expected_key[item['name']]}.labels")
            assert torch.equal(item["labels"], stored)
    # 4 images, batch 2: 2 steps an epoch, whatever the number of views.
    args = run_args(tmp_path / "run", data=None, embedding_cache=str(cache), max_steps=None, num_epochs=3)
    result = train(args, model=model)
    assert result.global_step == 6 and result.epochs_completed == 3


def _train_cli(tmp_path: Path, *flags: str) -> int:
    return main(["train", "--model", str(tmp_path / "model"), "--output-dir", str(tmp_path / "run"), "--batch-size",
                 "2", "--report-to", "none", "--no-progress", "--max-instances-per-image", "1", *flags])


@pytest.fixture
def cli_workspace(tmp_path: Path) -> Path:
    save_tiny_model(tmp_path / "model")
    write_folder(tmp_path / "data", shape_records(4))
    return tmp_path


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--eval-data", "{tmp}/no_such_folder"], "does not exist"),
        (["--eval-data", "{tmp}/saved", "--eval-split", "validation"], "validation"),
        (["--embedding-cache", "{tmp}/cache"], "--data and --embedding-cache both give the training data"),
        (["--steps-per-epoch", "3"], "--steps-per-epoch sets the epoch length of streamed data"),
    ],
    ids=["eval-path", "eval-split", "data-and-cache", "steps-per-epoch-on-folder"],
)
def test_wrong_flags_stop_before_training(cli_workspace: Path, capsys, flags: list[str], message: str) -> None:
    tmp = cli_workspace
    saved_dataset(tmp / "saved", 2)  # has a train split only
    flags = [flag.format(tmp=tmp) for flag in flags]
    assert _train_cli(tmp, "--data", str(tmp / "data"), "--max-steps", "2", "--checkpoint-every", "1", *flags) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("pasam train: error:")]
    assert len(errors) == 1 and message in errors[0], err
    assert not (tmp / "run" / "checkpoints").exists()  # nothing was trained


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--no-augment"], "--no-augment has no effect with --embedding-cache"),
        (["--instance-mode", "split"], "--instance-mode split has no effect with --embedding-cache"),
        (["--streaming"], "--streaming has no effect with --embedding-cache"),
        (["--resize-masks"], "--resize-masks has no effect with --embedding-cache"),
    ],
)
def test_flags_the_cache_would_ignore_are_refused(cli_workspace: Path, capsys, flags: list[str], message) -> None:
    assert _train_cli(cli_workspace, "--embedding-cache", str(cli_workspace / "cache"), *flags) == 2
    err = capsys.readouterr().err
    assert [line for line in err.splitlines() if line.startswith("pasam train: error:")] == [
        f"pasam train: error: {message}" + err.split(message, 1)[1].splitlines()[0]
    ]


def test_streaming_on_a_folder_warns(cli_workspace: Path, capsys) -> None:
    assert _train_cli(cli_workspace, "--data", str(cli_workspace / "data"), "--streaming", "--max-steps", "1") == 0
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "--streaming has no effect on" in warnings[0], warnings
