"""`pasam demo`: the whole PA-SAM workflow offline, in about two minutes on a laptop CPU.

It builds a small PA-SAM with **random weights** (not SAM's trained ones: nothing is downloaded), draws procedural
thin-structure images with exact masks (`pasam_hf.synthetic`: wires, rings, fences, text), scores the model on a
held-out set, fine-tunes the release's trainable set with `pasam_hf.training.train`, scores it again and writes,
into `--out`:

- `results.json`: the settings and the before/after mIoU and boundary IoU;
- `<name>_overlay.png` for a few held-out images: ground truth, prediction before and after fine-tuning, with the
  box prompt;
- `<name>_explain.png`: the fine-tuned adapter's internals (coarse mask, refined mask, uncertainty map, final mask,
  mined points), as `pasam segment --explain` draws them;
- `model/`: the fine-tuned model and processor (`save_pretrained`) and `model/adapter/` (adapter-only weights), so
  `pasam segment IMAGE --box ... --model OUT/model` runs on it.

The numbers only show that fine-tuning works end to end; a random trunk cannot segment real photos.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import PIL.Image
import PIL.ImageDraw
import PIL.ImageFont
import torch

from . import CLIError
from .segment import prepare_output_dir, save_png

# Settings of the default run, chosen so that it ends in about two minutes on 2 CPU cores and the held-out IoU
# clearly rises (see `_settings`). Images are 256 px so that the mask logits (64 x 64) can follow strokes a few
# pixels wide.
IMAGE_SIZE = 256
HIDDEN_SIZE = 64
DEFAULT_STEPS = 1000
QUICK_STEPS = 4

REAL_WEIGHTS_HINT = (
    "For real results use SAM's or PA-SAM's trained weights: `pasam convert sam_vit_b_01ec64.pth --out pa-sam-vit-b` "
    "(or a PA-SAM release checkpoint), then `pasam segment IMAGE --box X0 Y0 X1 Y1 --model pa-sam-vit-b` "
    "(--model also takes a Hub id)."
)
UNTRAINED_WARNING = (
    "NOTE: this demo uses a small, RANDOMLY INITIALISED PA-SAM, not trained SAM weights. Its absolute scores mean "
    "nothing; only the change from before to after fine-tuning does."
)


def _settings(steps: int | None, quick: bool) -> dict[str, int | float]:
    """Sizes of the run. The default is tuned for a clear IoU gain within the time budget; `--quick` only checks
    that every stage runs (seconds)."""
    if quick:
        return {"steps": steps or QUICK_STEPS, "train_images": 8, "eval_images": 4, "pictures": 2, "batch_size": 2,
                "learning_rate": 1e-3, "mining_warmup_epochs": 1}
    return {"steps": steps or DEFAULT_STEPS, "train_images": 256, "eval_images": 24, "pictures": 4, "batch_size": 4,
            "learning_rate": 2e-3, "mining_warmup_epochs": 4}


def _check_writable(out: Path) -> Path:
    out = prepare_output_dir(out)
    try:
        with tempfile.TemporaryFile(dir=out):
            pass
    except OSError as error:
        raise CLIError(
            f"--out {out} is not writable ({error.strerror}); choose a directory you can write to."
        ) from error
    return out


def _build_model(seed: int):
    from ..configuration_pasam import PASamConfig
    from ..modeling_pasam import PASamModel
    from ..processing_pasam import PASamProcessor

    # `rgb` edges: the edge mode for new training (`official` only matters for the release's weights). Width 64
    # learns the thin structures visibly better than 32 for about 10% more time per step.
    config = PASamConfig.small(image_size=IMAGE_SIZE, hidden_size=HIDDEN_SIZE, edge_mode="rgb")
    torch.manual_seed(seed)
    model = PASamModel(config)
    return model, PASamProcessor.from_model_config(config)


def _predict(model, processor, record) -> dict[str, np.ndarray]:
    """The model's outputs for `record`'s object prompted by its tight box, in the image frame."""
    from ..evaluation import box_prompts
    from ..visualization import input_frame_to_image_points

    foreground = torch.from_numpy(record.instances[:1] == 1)
    box = box_prompts(foreground)[0].tolist()
    inputs = processor(images=record.image, input_boxes=[[box]], return_tensors="pt")
    model.eval()
    with torch.inference_mode():
        outputs = model(
            pixel_values=inputs["pixel_values"].to(model.device),
            adapter_pixel_values=inputs["adapter_pixel_values"].to(model.device),
            input_boxes=inputs["input_boxes"].to(model.device),
            multimask_output=False,
        )

    def to_image(maps: torch.Tensor, binarize: bool) -> np.ndarray:
        # (1, 1, h, w) of the only prompt, input frame -> (H, W) image frame.
        frame = processor.post_process_masks(
            [maps[0].float().cpu()], inputs["original_sizes"], inputs["reshaped_input_sizes"], binarize=binarize
        )[0]
        return frame[0, 0].numpy()

    result = {
        "box": np.array(box),
        "mask": to_image(outputs.pred_masks, binarize=True),
        "coarse": to_image(outputs.coarse_masks, binarize=False),
        "refined": to_image(outputs.refined_masks, binarize=False),
        "uncertainty": to_image(outputs.uncertainty_maps, binarize=False),
        "mined_points": None,
        "mined_labels": None,
    }
    if outputs.mined_point_coords is not None:
        result["mined_points"] = input_frame_to_image_points(
            outputs.mined_point_coords[0, 0].cpu(), inputs["original_sizes"][0], inputs["reshaped_input_sizes"][0]
        )
        result["mined_labels"] = outputs.mined_point_labels[0, 0].cpu().numpy()
    return result


def _titled_row(pictures: list[PIL.Image.Image], titles: list[str], gap: int = 4) -> PIL.Image.Image:
    """Pictures of one height side by side, each under a title bar."""
    font = PIL.ImageFont.load_default()
    bar_height = 20
    width = sum(picture.width for picture in pictures) + gap * (len(pictures) - 1)
    row = PIL.Image.new("RGB", (width, pictures[0].height + bar_height), (255, 255, 255))
    draw = PIL.ImageDraw.Draw(row)
    x = 0
    for picture, title in zip(pictures, titles):
        draw.rectangle([x, 0, x + picture.width - 1, bar_height - 1], fill=(24, 24, 24))
        text_width = draw.textlength(title, font=font)
        draw.text((x + (picture.width - text_width) / 2, 4), title, fill=(240, 240, 240), font=font)
        row.paste(picture, (x, bar_height))
        x += picture.width + gap
    return row


def _score_table(before: dict[str, float], after: dict[str, float], count: int) -> str:
    lines = [
        f"held-out thin structures: {count} objects, tight box prompts (mean over objects, in %)",
        f"{'':<8}{'mIoU':>8}{'mBIoU':>8}",
        f"{'before':<8}{100 * before['mean_iou']:>8.2f}{100 * before['mean_boundary_iou']:>8.2f}",
        f"{'after':<8}{100 * after['mean_iou']:>8.2f}{100 * after['mean_boundary_iou']:>8.2f}",
        (
            f"{'change':<8}{100 * (after['mean_iou'] - before['mean_iou']):>+8.2f}"
            f"{100 * (after['mean_boundary_iou'] - before['mean_boundary_iou']):>+8.2f}"
        ),
    ]
    return "\n".join(lines)


def run_demo(args: argparse.Namespace) -> int:
    from ..evaluation import evaluate_model
    from ..synthetic import thin_structure_records
    from ..training import TrainingArguments, train
    from ..visualization import explain_panel, overlay_masks

    if args.steps is not None and args.steps < 1:
        raise CLIError(f"--steps is {args.steps}; use 1 or more optimizer steps.")
    if args.threads < 1:
        raise CLIError(f"--threads is {args.threads}; use 1 or more.")
    out = _check_writable(Path(args.out).expanduser())
    settings = _settings(args.steps, args.quick)
    # The small model gains little from intra-op threads on an idle CPU, and when other programs share the CPU,
    # torch's spinning OpenMP threads make each step tens of times slower (measured: 0.07 s per step with one
    # thread, 3 s with two, on 2 busy cores).
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    print(UNTRAINED_WARNING)
    print(REAL_WEIGHTS_HINT)
    print()

    model, processor = _build_model(args.seed)
    # Disjoint seeds: sample i of a set depends only on (set seed, i), so these two sets never share an image.
    train_records = thin_structure_records(settings["train_images"], size=IMAGE_SIZE, seed=2 * args.seed)
    eval_records = thin_structure_records(settings["eval_images"], size=IMAGE_SIZE, seed=2 * args.seed + 1)
    shown = eval_records[: settings["pictures"]]
    print(f"model: PA-SAM, {IMAGE_SIZE}x{IMAGE_SIZE} input, {sum(p.numel() for p in model.parameters()):,} random "
          f"parameters; data: {len(train_records)} training and {len(eval_records)} held-out images")

    before = evaluate_model(model, processor, eval_records, progress=True).mean_of_means()
    before_masks = [_predict(model, processor, record)["mask"] for record in shown]

    training_args = TrainingArguments(
        output_dir=str(out / "model"),
        data="pasam_hf.synthetic thin structures (in memory)",
        max_steps=settings["steps"],
        num_epochs=10**6,
        batch_size=settings["batch_size"],
        learning_rate=settings["learning_rate"],
        # One learning rate throughout: the release's x0.1 decay every 10 epochs assumes 21 long epochs.
        lr_decay_epochs=10**6,
        point_mining_warmup_epochs=settings["mining_warmup_epochs"],
        # No large-scale jitter: scaling by 0.1-2.0 would shrink strokes 1-4 px wide to nothing, and procedural
        # data can simply draw more images instead.
        augment=False,
        checkpoint_every=settings["steps"],
        report_to="none",
        seed=args.seed,
    )
    result = train(training_args, model=model, processor=processor, train_records=train_records)
    # The demo never resumes: the checkpoint train() leaves for --resume would only double the folder's size.
    shutil.rmtree(out / "model" / "checkpoints", ignore_errors=True)

    after = evaluate_model(model, processor, eval_records, progress=True).mean_of_means()

    written = []
    for record, before_mask in zip(shown, before_masks):
        prediction = _predict(model, processor, record)
        image = np.asarray(record.image)
        box = prediction["box"][None]
        overlays = [
            overlay_masks(image, record.instances[0] == 1, boxes=box),
            overlay_masks(image, before_mask, boxes=box),
            overlay_masks(image, prediction["mask"], boxes=box),
        ]
        titles = ["ground truth", "before fine-tuning", "after fine-tuning"]
        written.append(save_png(_titled_row(overlays, titles), out / f"{record.name}_overlay.png"))
        panel = explain_panel(
            image, prediction["coarse"], prediction["refined"], prediction["uncertainty"], prediction["mask"],
            mined_points=prediction["mined_points"], mined_labels=prediction["mined_labels"],
        )
        written.append(save_png(panel, out / f"{record.name}_explain.png"))

    seconds = time.perf_counter() - started
    summary = {
        "warning": UNTRAINED_WARNING,
        "settings": {"seed": args.seed, "image_size": IMAGE_SIZE, "quick": args.quick, **settings},
        "before": before,
        "after": after,
        "final_loss": result.losses[-1] if result.losses else None,
        "seconds": round(seconds, 1),
    }
    (out / "results.json").write_text(json.dumps(summary, indent=1) + "\n", encoding="utf-8")

    print()
    print(_score_table(before, after, len(eval_records)))
    print()
    print(f"wrote {len(written)} pictures, results.json and the fine-tuned model (model/) to {out} "
          f"in {seconds:.0f} s")
    print(f"try it: pasam segment IMAGE --box X0 Y0 X1 Y1 --model {out / 'model'} --out masks/ --explain")
    print()
    print(UNTRAINED_WARNING)
    print(REAL_WEIGHTS_HINT)
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "demo",
        help="offline demo: fine-tune a small random PA-SAM on procedural thin structures (CPU, ~2 min)",
        description="Build a small randomly initialised PA-SAM, score it on procedural thin-structure images, "
                    "fine-tune its adapter, score it again, and write overlays, explain panels and the fine-tuned "
                    "model. Needs no download and no GPU. The model is NOT trained SAM: only the before/after "
                    "change means something.",
        epilog="example: pasam demo --out ./pasam-demo",
    )
    parser.add_argument("--out", default="./pasam-demo", metavar="DIR",
                        help="output directory (created if missing; default: ./pasam-demo)")
    parser.add_argument("--steps", type=int, metavar="N",
                        help=f"optimizer steps of fine-tuning (default: {DEFAULT_STEPS}, or {QUICK_STEPS} with "
                             "--quick)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the weights, the data and training (default: 0)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads (default: 1, the fastest for this small model on a shared CPU)")
    parser.add_argument("--quick", action="store_true",
                        help="a few seconds: tiny data and a few steps, to check that everything runs")
    parser.set_defaults(func=run_demo)


__all__ = ["register", "run_demo"]
