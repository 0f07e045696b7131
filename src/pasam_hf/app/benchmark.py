"""`pasam benchmark app`: how long a click on the page takes (see docs/benchmarks.md for the conventions).

Two rows, each of interleaved repetitions after a warm-up (`pasam_hf.benchmarking`):

- the app's callback on a 480 x 854 photo, one foreground point, overlay drawing and mask files included: the first
  click on a new image (image encoder, guiding branch, decoder), a later click (the cached features: prompt encoder
  and decoder only), and the same click through `pasam segment`'s path, which recomputes everything (processor,
  whole model, `post_process_masks`, overlay). Targets: later / recomputed <= 0.05 and a later click <= 0.2 s.
- the decoder part of a later click, PA-SAM with the cached guiding embedding against SAM on the same trunk and the
  same image embedding (prompt encoder + mask decoder, one point); PA-SAM recomputing its guiding branch for
  reference. Target: cached PA-SAM / SAM <= 1.10.
"""

from __future__ import annotations

import numpy as np
import torch

from ..benchmarking import (
    BenchmarkSettings,
    BenchmarkTable,
    _caller,
    _describe,
    _move,
    build_models,
    interleaved_times,
    processors_for,
    ratio_row,
    real_images,
    sam_config,
    synthetic_photo,
)
from ..visualization import overlay_masks
from .engine import FeatureCache, Prompt, SegmentationEngine
from .session import Session

PHOTO_SIZE = (480, 854)


def _photo(settings: BenchmarkSettings, table: BenchmarkTable) -> np.ndarray:
    """The first DAVIS photo (480 x 854), or a synthetic one of that size when the data is absent (noted)."""
    images = real_images(settings, 1)
    if images is not None and images[0].shape[:2] == PHOTO_SIZE:
        table.notes.append("photo: davis345/images first photo, 480 x 854.")
        return images[0]
    table.notes.append("photo: synthetic 480 x 854 (davis345 not found).")
    return synthetic_photo(*PHOTO_SIZE, seed=0)


def bench_app(settings: BenchmarkSettings) -> BenchmarkTable:
    """First and later clicks of the app against `pasam segment`'s recomputing path, and the decoder of a later
    click, PA-SAM (cached guiding embedding) against SAM."""
    # As the page runs (`pasam_hf.app.ui.serve`): subnormal floats flushed to zero. The random ViT-B trunk produces
    # them on real photos, and they made one image-encoder call 28x slower on this CPU (390 s against 14 s).
    flushing = torch.set_flush_denormal(True)
    try:
        table = _bench_app(settings)
    finally:
        torch.set_flush_denormal(False)
    if flushing:
        table.notes.append("subnormal floats flushed to zero (torch.set_flush_denormal), as the page runs.")
    return table


def _bench_app(settings: BenchmarkSettings) -> BenchmarkTable:
    config = sam_config(settings.quick)
    models = build_models(config, kinds=("sam", "pasam"), device=settings.device, dtype=settings.dtype,
                          seed=settings.seed)
    pasam, processor = models["pasam"], processors_for(config)["pasam"]
    table = BenchmarkTable(
        title="App: a click on the page (1 foreground point)",
        value_columns=["recomputed", "first click", "later click", "sam decoder", "pasam decoder cached",
                       "pasam decoder uncached"],
        ratio_columns=["later/recomputed", "first/recomputed", "cached/sam", "uncached/sam"],
    )
    photo = _photo(settings, table)
    height, width = photo.shape[:2]
    point = (width * 0.45, height * 0.55)

    engine = SegmentationEngine(pasam, processor)
    later = Session()
    later.load(engine, photo, "photo")

    def first_click() -> None:
        engine.cache = FeatureCache(engine.cache.capacity)  # a new image: nothing cached
        session = Session()
        session.load(engine, photo, "photo")
        session.click(engine, *point)

    def later_click() -> None:
        later.prompt = Prompt()
        later.click(engine, *point)

    def recomputed() -> None:
        # `pasam segment`'s path for one image: processor, whole model, post-processing, overlay.
        inputs = processor(images=photo, input_points=[[[list(point)]]], input_labels=[[[1]]], return_tensors="pt")
        model_inputs = {key: inputs[key] for key in ("pixel_values", "adapter_pixel_values", "input_points",
                                                     "input_labels")}
        with torch.inference_mode():
            outputs = pasam(**_move(model_inputs, settings.device, settings.dtype), multimask_output=False)
        masks = processor.post_process_masks(
            [outputs.pred_masks[0].float().cpu()], inputs["original_sizes"], inputs["reshaped_input_sizes"]
        )[0][:, 0].numpy()
        overlay_masks(photo, masks, points=[point], point_labels=[1])

    repeats = settings.num_repeats(7)
    # The encoder already ran (`later.load`) and a ViT-B call takes seconds: only the cheap click is warmed up, so
    # that a run costs one image-encoder call less per column.
    for _ in range(2):
        later_click()
    times = interleaved_times(
        {"recomputed": recomputed, "first click": first_click, "later click": later_click}, repeats, warmup=0,
        device=settings.device,
    )
    table.add_row(
        f"app callback, {height}x{width} photo",
        *ratio_row(times, {"later/recomputed": ("later click", "recomputed"),
                           "first/recomputed": ("first click", "recomputed")}),
    )

    # The decoder of a later click: the same image embedding for both models, PA-SAM's guiding embedding cached.
    features = engine.features(photo)
    prompt = engine.model_prompts(Prompt(points=(point,), labels=(1,)), features)
    adapter_pixel_values = processor(images=photo, return_tensors="pt")["adapter_pixel_values"]
    common = {"image_embeddings": features.image_embeddings, **prompt, "multimask_output": False}
    decoder_calls = {
        "sam decoder": _caller(models["sam"], _move(common, settings.device, settings.dtype)),
        "pasam decoder cached": _caller(pasam, _move(
            {**common, "adapter_embeddings": features.adapter_embeddings}, settings.device, settings.dtype)),
        "pasam decoder uncached": _caller(pasam, _move(
            {**common, "adapter_pixel_values": adapter_pixel_values}, settings.device, settings.dtype)),
    }
    decoder_repeats = settings.num_repeats(21)
    decoder_times = interleaved_times(decoder_calls, decoder_repeats, warmup=2, device=settings.device)
    table.add_row(
        "decoder of a click",
        *ratio_row(decoder_times, {"cached/sam": ("pasam decoder cached", "sam decoder"),
                                   "uncached/sam": ("pasam decoder uncached", "sam decoder")}),
    )
    table.notes.append(_describe(settings, config, repeats) + f" Decoder row: {decoder_repeats} repetitions.")
    table.notes.append(
        "recomputed: `pasam segment`'s path (processor, image encoder, guiding branch, decoder, post-processing, "
        "overlay); first click: a new image on the page (features computed, then the click); later click: the "
        "page's click callback with the image's features cached (decoder, post-processing, overlay, mask PNG and "
        "COCO JSON written). Targets: later/recomputed <= 0.05, later click <= 200 ms, cached/sam <= 1.10."
    )
    return table


__all__ = ["bench_app"]
