"""Reliability under concurrency: one model and one processor shared by several threads give exactly the masks of
sequential calls (no shared mutable state in preprocessing, the adapter, point mining or post-processing)."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from conftest import synthetic_image
from PIL import Image

from pasam_hf import PASamModel, PASamProcessor

NUM_THREADS = 4
MODEL_KEYS = ("pixel_values", "adapter_pixel_values", "input_points", "input_labels", "input_boxes")


def _cases() -> list[tuple[object, dict]]:
    """Different images (kinds and sizes) and prompts, so that a leak between threads would show."""
    cases = []
    for seed in range(6):
        height, width = 40 + 9 * seed, 70 - 5 * seed
        image = synthetic_image(height, width, seed=seed)
        if seed % 3 == 0:
            prompt = {"input_boxes": [[[2.0 + seed, 3.0, width - 4.0, height - 2.0 - seed]]]}
        elif seed % 3 == 1:
            prompt = {"input_points": [[[width / 2, height / 2], [1.0 + seed, 2.0]]], "input_labels": [[1, 0]]}
        else:
            prompt = {"input_points": [[[width / 3, height / 3]]], "input_boxes": [[[0.0, 0.0, width / 2, height]]]}
        cases.append((Image.fromarray(image) if seed % 2 else image / 255.0, prompt))
    return cases


def _segment(model: PASamModel, processor: PASamProcessor, case: tuple[object, dict], start=None) -> dict:
    image, prompt = case
    if start is not None:
        start.wait(timeout=60)  # all threads enter the model together
    # Gradient mode is per thread: each worker must switch it off itself.
    with torch.no_grad():
        inputs = processor(images=image, return_tensors="pt", **prompt)
        outputs = model(**{key: inputs[key] for key in MODEL_KEYS if key in inputs})
    masks = processor.post_process_masks(outputs.pred_masks, inputs["original_sizes"], inputs["reshaped_input_sizes"])
    return {
        "logits": outputs.pred_masks,
        "iou_scores": outputs.iou_scores,
        "mined_points": outputs.mined_point_coords,
        "masks": masks[0],
        "requires_grad": outputs.pred_masks.requires_grad,
    }


def test_threads_sharing_a_model_and_processor_match_sequential_calls(model, processor) -> None:
    cases = _cases()
    sequential = [_segment(model, processor, case) for case in cases]
    rounds = 3
    start = threading.Barrier(NUM_THREADS)
    work = [cases[i % len(cases)] for i in range(rounds * NUM_THREADS)]
    with ThreadPoolExecutor(max_workers=NUM_THREADS) as pool:
        concurrent = list(pool.map(lambda case: _segment(model, processor, case, start), work))
    for index, result in enumerate(concurrent):
        expected = sequential[index % len(cases)]
        assert not result["requires_grad"]
        for key in ("logits", "iou_scores", "mined_points", "masks"):
            assert torch.equal(result[key], expected[key]), f"call {index}: {key} differs from the sequential call"


def test_threads_never_mix_up_prompts(model, processor) -> None:
    """Many short calls with prompts that differ only slightly: a mix-up of prompts between threads would give the
    mask of a neighbouring box."""
    image = synthetic_image(64, 64)
    boxes = [[[[float(x), 8.0, float(x) + 20.0, 40.0]]] for x in range(0, 40, 5)]

    def run(box):
        with torch.no_grad():
            inputs = processor(images=image, input_boxes=box, return_tensors="pt")
            return inputs["input_boxes"].clone(), model(**{k: inputs[k] for k in MODEL_KEYS if k in inputs}).pred_masks

    expected = [run(box) for box in boxes]
    with ThreadPoolExecutor(max_workers=NUM_THREADS) as pool:
        results = list(pool.map(run, boxes * 2))
    for index, (sent, logits) in enumerate(results):
        want_sent, want_logits = expected[index % len(boxes)]
        assert torch.equal(sent, want_sent) and torch.equal(logits, want_logits), index
    assert not np.array_equal(expected[0][1].numpy(), expected[-1][1].numpy())
