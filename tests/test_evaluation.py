"""Box-prompted evaluation (`pasam_hf.evaluation.evaluate_model`, both protocols) on a tiny random model, checked
against the model's own outputs scored by hand; the `pasam evaluate` command line."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
import torch.nn.functional as F
from conftest import synthetic_image, tiny_config

from pasam_hf import PASamModel, PASamProcessor
from pasam_hf.cli import main
from pasam_hf.data import SegmentationRecord, load_records
from pasam_hf.evaluation import box_prompts, evaluate_model, squash_image
from pasam_hf.metrics import boundary_iou

INPUT_SIZE = 128  # tiny_config()'s square model input: what --squash resizes to


def make_record(name: str, height: int, width: int, boxes: list[tuple[int, int, int, int]], seed: int,
                subset: str = "") -> SegmentationRecord:
    """An image with one rectangular instance per `(y0, y1, x0, x1)`, the top two rows void in every instance."""
    instances = np.zeros((len(boxes), height, width), dtype=np.uint8)
    for index, (y0, y1, x0, x1) in enumerate(boxes):
        instances[index, y0:y1, x0:x1] = 1
    instances[:, :2] = 255
    image = PIL.Image.fromarray(synthetic_image(height, width, seed=seed))
    return SegmentationRecord(name=name, image=image, instances=instances, subset=subset)


@pytest.fixture(scope="module")
def tiny():
    config = tiny_config()
    torch.manual_seed(0)
    return PASamModel(config).eval(), PASamProcessor.from_model_config(config)


@pytest.fixture(scope="module")
def records() -> list[SegmentationRecord]:
    return [
        # Instance 1 lies entirely in the void rows: no foreground, skipped.
        make_record("wide", 96, 128, [(10, 40, 8, 60), (0, 2, 0, 10), (50, 90, 70, 120)], seed=0, subset="A"),
        make_record("tall", 70, 50, [(20, 60, 5, 30)], seed=1, subset="A"),
        make_record("square", 64, 64, [(5, 30, 30, 62), (35, 64, 0, 20)], seed=2, subset="B"),
    ]


def recorded_forward(model: PASamModel) -> tuple[list[dict], torch.utils.hooks.RemovableHandle]:
    """Record the keyword inputs and the mode of every forward pass of `model`."""
    calls: list[dict] = []

    def hook(module, args, kwargs):
        calls.append({**{k: v for k, v in kwargs.items() if isinstance(v, torch.Tensor)}, "training": module.training})

    return calls, model.register_forward_pre_hook(hook, with_kwargs=True)


def hand_scores(masks: torch.Tensor, record: SegmentationRecord, instances: list[int]) -> list[tuple[float, float]]:
    """(IoU, boundary IoU) of predicted masks `(P, H, W)` against the record's instances, void pixels ignored."""
    scores = []
    for pred, index in zip(masks.numpy(), instances):
        gt, valid = record.instances[index] == 1, record.instances[index] != 255
        iou = np.count_nonzero(pred & gt & valid) / np.count_nonzero((pred | gt) & valid)
        scores.append((iou, boundary_iou(pred, gt, ignore=~valid).item()))
    return scores


def test_box_prompts_are_tight_pixel_boxes():
    masks = torch.zeros(3, 10, 12, dtype=torch.bool)
    masks[0, 3:6, 2:8] = True  # rows 3-5, columns 2-7
    masks[1, 4, 9] = True  # a single pixel: the box gets one pixel of width and height
    masks[2, 0:10, 11] = True  # one column along the right border
    assert box_prompts(masks).tolist() == [[2, 3, 7, 5], [9, 4, 10, 5], [11, 0, 12, 9]]
    with pytest.raises(ValueError, match="foreground"):
        box_prompts(torch.zeros(1, 4, 4, dtype=torch.bool))


def test_squash_image_ignores_the_aspect_ratio():
    image = np.zeros((30, 80, 3), dtype=np.uint8)
    image[:, 40:] = 200  # right half bright: stays the right half
    squashed = squash_image(image, (64, 64))
    assert squashed.shape == (64, 64, 3) and squashed.dtype == np.uint8
    assert (squashed[:, :31] == 0).all() and (squashed[:, 33:] == 200).all()


def test_evaluate_model_scores_the_models_own_masks(tiny, records):
    model, processor = tiny
    calls, handle = recorded_forward(model)
    try:
        metrics = evaluate_model(model, processor, records, batch_size=2, progress=False)
    finally:
        handle.remove()
    assert [(row["subset"], row["image"], row["instance"]) for row in metrics.rows] == [
        ("A", "wide", 0), ("A", "wide", 2), ("A", "tall", 0), ("B", "square", 0), ("B", "square", 1)
    ]
    assert metrics.skipped == 1
    # Two forward passes (2 + 1 images), every instance of an image as one prompt each, in eval mode.
    assert [tuple(call["input_boxes"].shape) for call in calls] == [(2, 2, 4), (1, 2, 4)]
    assert all(not call["training"] for call in calls)
    # The processor's frame: longest side to 128, so the 96x128 image keeps its scale and the 70x50 one becomes
    # 128x91 (x by 91/50, y by 128/70).
    np.testing.assert_allclose(calls[0]["input_boxes"][0], [[8, 10, 59, 39], [70, 50, 119, 89]], rtol=1e-6)
    scale = np.array([91 / 50, 128 / 70] * 2)
    np.testing.assert_allclose(calls[0]["input_boxes"][1, 0], np.array([5, 20, 29, 59]) * scale, rtol=1e-6)

    # The first image by hand: its two boxes, one forward, logits back to 96x128 with post_process_masks, > 0.
    record = records[0]
    inputs = processor(images=np.array(record.image), input_boxes=[[[8, 10, 59, 39], [70, 50, 119, 89]]],
                       return_tensors="pt")
    with torch.no_grad():
        outputs = model(pixel_values=inputs["pixel_values"], adapter_pixel_values=inputs["adapter_pixel_values"],
                        input_boxes=inputs["input_boxes"], multimask_output=False)
    assert outputs.pred_masks.shape == (1, 2, 1, 32, 32)
    masks = processor.post_process_masks(outputs.pred_masks, inputs["original_sizes"], inputs["reshaped_input_sizes"])
    masks = masks[0][:, 0]
    assert masks.shape == (2, 96, 128)
    expected = hand_scores(masks, record, [0, 2])
    np.testing.assert_allclose([(row["iou"], row["boundary_iou"]) for row in metrics.rows[:2]], expected, atol=1e-12)
    assert 0 < expected[0][0] < 1  # a real, imperfect prediction: the check compares actual numbers


def test_evaluate_model_squash_protocol(tiny, records):
    model, processor = tiny
    calls, handle = recorded_forward(model)
    try:
        metrics = evaluate_model(model, processor, records[1:2], squash=True, progress=False)
    finally:
        handle.remove()
    record = records[1]  # 70x50: squashed to 128x128, x by 128/50 and y by 128/70
    box = [5 * 128 / 50, 20 * 128 / 70, 29 * 128 / 50, 59 * 128 / 70]
    np.testing.assert_allclose(calls[0]["input_boxes"][0], [box], rtol=1e-6)

    pixels = torch.from_numpy(np.array(record.image)).permute(2, 0, 1)[None].float()
    squashed = F.interpolate(pixels, size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear", align_corners=False)
    squashed = squashed[0].permute(1, 2, 0).round().clamp(0, 255).to(torch.uint8).numpy()
    inputs = processor(images=squashed, input_boxes=[[box]], return_tensors="pt")
    assert inputs["reshaped_input_sizes"].tolist() == [[INPUT_SIZE, INPUT_SIZE]]  # the whole input, no padding
    with torch.no_grad():
        outputs = model(pixel_values=inputs["pixel_values"], adapter_pixel_values=inputs["adapter_pixel_values"],
                        input_boxes=inputs["input_boxes"], multimask_output=False)
    # The low-resolution logits straight to the ground truth's 70x50, bilinear.
    masks = F.interpolate(outputs.pred_masks[0], size=(70, 50), mode="bilinear", align_corners=False)[:, 0] > 0
    expected = hand_scores(masks, record, [0])
    np.testing.assert_allclose([(row["iou"], row["boundary_iou"]) for row in metrics.rows], expected, atol=1e-12)
    # The two protocols see different inputs, so they score differently.
    plain = evaluate_model(model, processor, records[1:2], progress=False)
    assert plain.rows[0]["iou"] != metrics.rows[0]["iou"]


@pytest.mark.parametrize("squash", [False, True])
def test_batching_does_not_change_the_scores(tiny, records, squash):
    # Images with 2, 1 and 2 prompts share forward passes: the 1-prompt image's box is repeated, then dropped.
    model, processor = tiny
    alone = evaluate_model(model, processor, records, batch_size=1, squash=squash, progress=False)
    together = evaluate_model(model, processor, records, batch_size=3, squash=squash, progress=False)
    assert [row["image"] for row in together.rows] == [row["image"] for row in alone.rows]
    for one, batched in zip(alone.rows, together.rows):
        assert (batched["iou"], batched["boundary_iou"]) == pytest.approx((one["iou"], one["boundary_iou"]), abs=1e-6)


def test_evaluate_model_options(tiny, records):
    model, processor = tiny
    model.train()
    try:
        # Any iterable of records (a generator has no length), a subset override, the model's mode restored.
        metrics = evaluate_model(model, processor, (r for r in records), subset="all", device="cpu", progress=False)
        assert model.training
    finally:
        model.eval()
    assert metrics.subsets() == ["all"] and len(metrics) == 5
    # An empty mask (no instance at all) is one object that cannot be prompted.
    empty = SegmentationRecord("empty", records[0].image, np.zeros((0, 96, 128), dtype=np.uint8))
    assert evaluate_model(model, processor, [empty], progress=False).skipped == 1
    with pytest.raises(ValueError, match="batch_size"):
        evaluate_model(model, processor, records, batch_size=0)


def test_subsets_come_from_sub_folders(tiny, tmp_path):
    model, processor = tiny
    for subset, seed in (("DIS-VD", 0), ("COIFT", 1)):
        for folder in ("im", "gt"):
            (tmp_path / subset / folder).mkdir(parents=True)
        PIL.Image.fromarray(synthetic_image(48, 64, seed=seed)).save(tmp_path / subset / "im" / "a.jpg")
        mask = np.zeros((48, 64), dtype=np.uint8)
        mask[10:40, 15:50] = 255
        PIL.Image.fromarray(mask).save(tmp_path / subset / "gt" / "a.png")
    metrics = evaluate_model(model, processor, load_records(tmp_path), progress=False)
    assert sorted(metrics.subsets()) == ["COIFT", "DIS-VD"]
    assert set(metrics.subset_means()) == {"COIFT", "DIS-VD"}


def test_real_photos_with_void_bands(tiny, hq_fixture):
    model, processor = tiny
    root = Path(hq_fixture[0]["image"]).parents[1]
    records = list(load_records(root))
    metrics = evaluate_model(model, processor, records, squash=True, progress=False)
    assert sorted(row["image"] for row in metrics.rows) == sorted(item["id"] for item in hq_fixture)
    assert metrics.skipped == 0
    # The GrabCut masks' unknown band (128) is void: scoring it as background changes the numbers.
    record = next(r for r in records if (r.instances == 255).any())
    as_background = SegmentationRecord(record.name, record.image, np.where(record.instances == 255, 0, record.instances))
    void_row = next(row for row in metrics.rows if row["image"] == record.name)
    background_row = evaluate_model(model, processor, [as_background], squash=True, progress=False).rows[0]
    assert void_row["iou"] != background_row["iou"]


# ------------------------------------------------------------------------------------------------- command line
@pytest.fixture(scope="module")
def model_dir(tiny, tmp_path_factory) -> Path:
    model, processor = tiny
    path = tmp_path_factory.mktemp("model")
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    """images/ + masks/: a trimap mask (0, 128 void, 255) and a label map (1 object, 255 void)."""
    root = tmp_path_factory.mktemp("data")
    (root / "images").mkdir()
    (root / "masks").mkdir()
    PIL.Image.fromarray(synthetic_image(96, 128, seed=0)).save(root / "images" / "disc.png")
    trimap = np.zeros((96, 128), dtype=np.uint8)
    trimap[24:72, 40:88] = 255
    trimap[22:24, 40:88] = 128
    PIL.Image.fromarray(trimap).save(root / "masks" / "disc.png")
    PIL.Image.fromarray(synthetic_image(60, 80, seed=1)).save(root / "images" / "small.jpg")
    labels = np.zeros((60, 80), dtype=np.uint8)
    labels[10:50, 20:70] = 1
    labels[:, :3] = 255
    PIL.Image.fromarray(labels).save(root / "masks" / "small.png")
    return root


def test_cli_writes_objects_csv_and_metrics_json(tiny, model_dir, data_dir, tmp_path):
    out = tmp_path / "results"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    completed = subprocess.run(
        [sys.executable, "-m", "pasam_hf", "evaluate", "--data", str(data_dir), "--model", str(model_dir),
         "--device", "cpu", "--batch-size", "2", "--out", str(out)],
        capture_output=True, text=True, env=env, timeout=300, check=False,
    )
    assert completed.returncode == 0, completed.stderr
    assert "Average" in completed.stdout and "mIoU" in completed.stdout
    assert "Loading weights" not in completed.stderr
    with (out / "objects.csv").open(newline="") as file:
        rows = list(csv.DictReader(file))
    summary = json.loads((out / "metrics.json").read_text())
    assert [row["image"] for row in rows] == ["disc", "small"]
    assert summary["num_scored"] == 2 and summary["num_skipped"] == 0

    # The same evaluation in this process, with the model the command loaded: the same numbers.
    model, processor = tiny
    expected = evaluate_model(model, processor, load_records(data_dir), progress=False)
    assert [float(row["iou"]) for row in rows] == pytest.approx([row["iou"] for row in expected.rows], abs=1e-9)
    assert summary["average"]["mean_boundary_iou"] == pytest.approx(expected.mean_of_means()["mean_boundary_iou"])


@pytest.mark.parametrize(
    "case, message",
    [("data", "does not exist"), ("model", "does not exist")],
)
def test_cli_errors_are_one_line_with_exit_code_2(model_dir, data_dir, tmp_path, capsys, case, message):
    data = str(tmp_path / "no-such-data") if case == "data" else str(data_dir)
    model = str(tmp_path / "no-such-model") if case == "model" else str(model_dir)
    code = main(["evaluate", "--data", data, "--model", model, "--device", "cpu"])
    captured = capsys.readouterr()
    assert code == 2
    error_line, hint = captured.err.strip().splitlines()
    assert error_line.startswith("pasam evaluate: error: ") and message in error_line
    assert ("no-such-data" if case == "data" else "no-such-model") in error_line
    assert hint == "(run with --debug for the full traceback)"
    assert captured.out == ""


def test_training_evaluates_after_each_epoch(tiny, records, tmp_path, capsys):
    from pasam_hf.training import TrainingArguments, train

    torch.manual_seed(0)
    model = PASamModel(tiny_config())
    args = TrainingArguments(
        # Two epochs of one step: the evaluation after the first one is printed.
        output_dir=str(tmp_path / "run"), data="in-memory", batch_size=2, num_epochs=2, checkpoint_every=100,
        report_to="none", progress=False, max_instances_per_image=2,
    )
    train(args, model=model, train_records=records[:2], eval_records=records)
    line = next(line for line in capsys.readouterr().out.splitlines() if "evaluation" in line)
    assert line.startswith("epoch 0 evaluation: mIoU ") and "over 5 objects (1 skipped)" in line


def test_training_evaluates_the_last_epoch_and_a_run_stopped_mid_epoch(tiny, records, tmp_path, capsys):
    from pasam_hf.training import TrainingArguments, train

    def evaluation_lines(**overrides) -> list[str]:
        torch.manual_seed(0)
        settings = dict(
            output_dir=str(tmp_path / f"run{len(overrides)}"), data="in-memory", batch_size=2, checkpoint_every=100,
            report_to="none", progress=False, max_instances_per_image=2,
        )
        train(TrainingArguments(**{**settings, **overrides}), model=PASamModel(tiny_config()),
              train_records=records[:4], eval_records=records)
        return [line for line in capsys.readouterr().out.splitlines() if "evaluation:" in line]

    # One epoch of two steps, ended by the step count: the finished epoch is still evaluated, once.
    lines = evaluation_lines(num_epochs=1)
    assert [line.split(" evaluation")[0] for line in lines] == ["epoch 0"]
    # Stopped by --max-steps inside the first epoch: the saved weights are evaluated at that step.
    lines = evaluation_lines(num_epochs=5, max_steps=1)
    assert [line.split(" evaluation")[0] for line in lines] == ["step 1"]
    # Exactly at an epoch's end: evaluated as that epoch, not twice.
    lines = evaluation_lines(num_epochs=5, max_steps=2)
    assert [line.split(" evaluation")[0] for line in lines] == ["epoch 0"]


def test_cli_scores_or_skips_every_sample_with_its_reason(model_dir, tmp_path, capsys):
    """2 good pairs and 3 bad ones (truncated image, mask of another size, empty mask): 5 samples, 2 scored and 3
    skipped, each named with its reason in the table and in metrics.json."""
    data = tmp_path / "data"
    (data / "images").mkdir(parents=True)
    (data / "masks").mkdir()
    mask = np.zeros((96, 128), dtype=np.uint8)
    mask[30:70, 40:90] = 255
    for stem, seed in (("good_a", 0), ("good_b", 1)):
        PIL.Image.fromarray(synthetic_image(96, 128, seed=seed)).save(data / "images" / f"{stem}.png")
        PIL.Image.fromarray(mask).save(data / "masks" / f"{stem}.png")
    (data / "images" / "broken_scan.png").write_bytes(b"\x89PNG\r\n\x1a\n cut short")
    PIL.Image.fromarray(mask).save(data / "masks" / "broken_scan.png")
    PIL.Image.fromarray(synthetic_image(96, 128, seed=2)).save(data / "images" / "wrong_size.png")
    PIL.Image.fromarray(mask[:48, :64]).save(data / "masks" / "wrong_size.png")
    PIL.Image.fromarray(synthetic_image(96, 128, seed=3)).save(data / "images" / "no_object.png")
    PIL.Image.fromarray(np.zeros_like(mask)).save(data / "masks" / "no_object.png")

    out = tmp_path / "results"
    code = main(["evaluate", "--data", str(data), "--model", str(model_dir), "--device", "cpu", "--out", str(out)])
    table = capsys.readouterr().out
    assert code == 0
    assert "(3 objects skipped, in 3 images:" in table
    reasons = {
        "broken_scan": "cannot be read as an image",
        "wrong_size": "is 64x48 (WxH) but its image is 128x96",
        "no_object": "the mask has no foreground pixel",
    }
    for stem, reason in reasons.items():
        line = next(line for line in table.splitlines() if line.startswith(f"  {stem}: "))
        assert reason in line, table
    summary = json.loads((out / "metrics.json").read_text())
    assert summary["num_scored"] == 2 and summary["num_skipped"] == 3
    skipped = {sample["image"]: sample for sample in summary["skipped"]}
    assert sorted(skipped) == sorted(reasons)
    for stem, reason in reasons.items():
        assert reason in skipped[stem]["reason"] and skipped[stem]["count"] == 1


def test_cli_messages_name_flags_not_python_arguments(model_dir, tmp_path, capsys):
    """On the command line, the fixes a message suggests are flags: --resize-masks (which exists and works),
    --image-column / --mask-column, --split; never resize_masks=True, image_column=..., split='...'."""
    import datasets

    data = tmp_path / "data"
    (data / "images").mkdir(parents=True)
    (data / "masks").mkdir()
    mask = np.zeros((96, 128), dtype=np.uint8)
    mask[30:70, 40:90] = 255
    PIL.Image.fromarray(synthetic_image(96, 128, seed=0)).save(data / "images" / "half_size.png")
    PIL.Image.fromarray(mask[::2, ::2]).save(data / "masks" / "half_size.png")
    command = ["evaluate", "--data", str(data), "--model", str(model_dir), "--device", "cpu"]
    assert main(command) == 2
    err = capsys.readouterr().err
    assert "pass --resize-masks to resize masks" in err and "resize_masks=" not in err, err
    assert main([*command, "--resize-masks"]) == 0
    assert "(all)          1" in capsys.readouterr().out

    saved = tmp_path / "saved"
    dataset = datasets.Dataset.from_dict({"pixels": [PIL.Image.fromarray(synthetic_image(96, 128))], "label": [mask]})
    datasets.DatasetDict(validation=dataset).save_to_disk(str(saved))
    for extra, expected, python in (
        ([], "Pass --image-column and --mask-column naming", "image_column="),
        (["--image-column", "pixels", "--mask-column", "label", "--split", "test"], "--split test not in the dataset",
         "split="),
    ):
        assert main(["evaluate", "--data", str(saved), "--model", str(model_dir), *extra]) == 2
        err = capsys.readouterr().err
        assert expected in err and python not in err, err
