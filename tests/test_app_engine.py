"""The app's callbacks as functions (no browser): `pasam_hf.app.session.Session` actions on a shared
`SegmentationEngine`, with a tiny random model."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from conftest import synthetic_image

from pasam_hf.app import CLICK_MODES, Prompt, SegmentationEngine, Session
from pasam_hf.app.images import example_images, read_upload
from pasam_hf.app.session import BACKGROUND, BOX, FOREGROUND
from pasam_hf.cli.generate import rle_decode


@pytest.fixture
def image() -> np.ndarray:
    # Not the model's input size (128), so that prompts and masks are rescaled between the frames.
    return synthetic_image(150, 200)


@pytest.fixture
def engine(model, processor) -> SegmentationEngine:
    return SegmentationEngine(model, processor, cache_size=2)


@pytest.fixture
def session(engine, image) -> Session:
    session = Session()
    session.load(engine, image, name="disc")
    return session


def _direct(model, processor, image, multimask: bool, points=None, labels=None, box=None):
    """Masks and IoUs of `PASamModel` called directly on the processor's output, as `pasam segment` does."""
    prompts = {}
    if points:
        prompts["input_points"], prompts["input_labels"] = [[points]], [[labels]]
    if box:
        prompts["input_boxes"] = [[box]]
    inputs = processor(images=image, **prompts, return_tensors="pt")
    with torch.inference_mode():
        outputs = model(**{k: v for k, v in inputs.items() if k not in ("original_sizes", "reshaped_input_sizes")},
                        multimask_output=multimask)
    masks = processor.post_process_masks(
        [outputs.pred_masks[0]], inputs["original_sizes"], inputs["reshaped_input_sizes"]
    )[0][0].numpy()
    return masks, outputs.iou_scores[0, 0].numpy()


# (mode, x, y) clicks, then what the model is called with directly.
CASES = {
    "one point": ([(FOREGROUND, 100, 75)], {"points": [[100, 75]], "labels": [1]}),
    "points": ([(FOREGROUND, 100, 75), (BACKGROUND, 10, 140)], {"points": [[100, 75], [10, 140]], "labels": [1, 0]}),
    "box": ([(BOX, 30, 20), (BOX, 170, 125)], {"box": [30, 20, 170, 125]}),
    "box drawn backwards and a point": (
        [(BOX, 170, 125), (BOX, 30, 20), (BACKGROUND, 50, 50)],
        {"box": [30, 20, 170, 125], "points": [[50, 50]], "labels": [0]},
    ),
}


@pytest.mark.parametrize("multimask", [False, True])
@pytest.mark.parametrize("case", sorted(CASES))
def test_clicks_give_the_masks_of_the_model_called_directly(model, processor, engine, session, image, case, multimask):
    clicks, direct = CASES[case]
    for mode, x, y in clicks:
        view = session.click(engine, x, y, mode, multimask=multimask)
    masks, scores = _direct(model, processor, image, multimask, **direct)
    assert session.result.masks.shape == masks.shape == ((3 if multimask else 1), *image.shape[:2])
    np.testing.assert_array_equal(session.result.masks, masks)
    np.testing.assert_allclose(session.result.scores, scores, rtol=1e-5, atol=1e-6)
    # The shown and downloaded mask is the one with the highest predicted IoU.
    best = int(np.argmax(scores))
    assert np.array_equal(np.asarray(PIL.Image.open(view.mask_file)) > 0, masks[best])
    assert len(view.candidates) == (3 if multimask else 0)
    document = json.loads(Path(view.json_file).read_text())
    assert document["image"] == {"file_name": "disc", "height": image.shape[0], "width": image.shape[1]}
    for annotation, mask in zip(document["annotations"], masks):
        segmentation = annotation["segmentation"]
        if isinstance(segmentation["counts"], str):
            from pycocotools import mask as coco_mask

            decoded = coco_mask.decode({**segmentation, "counts": segmentation["counts"].encode()}).astype(bool)
        else:
            decoded = rle_decode(segmentation)
        assert np.array_equal(decoded, mask)


def test_explain_outputs_match_the_model(model, processor, engine, session, image) -> None:
    view = session.click(engine, 64, 48, FOREGROUND, explain=True)
    inputs = processor(images=image, input_points=[[[[64, 48]]]], return_tensors="pt")
    with torch.inference_mode():
        outputs = model(pixel_values=inputs["pixel_values"], input_points=inputs["input_points"])
    coarse = processor.post_process_masks(
        [outputs.coarse_masks[0]], inputs["original_sizes"], inputs["reshaped_input_sizes"], binarize=False
    )[0][0, 0].numpy()
    np.testing.assert_allclose(session.result.coarse, coarse, rtol=1e-4, atol=1e-4)
    assert session.result.uncertainty.shape == image.shape[:2]
    assert session.result.mined_points.shape == (2 * model.config.mask_decoder_config.num_mined_points, 2)
    assert view.explain is not None and view.explain.shape[1] > 4 * view.explain.shape[0]
    # Without explain, no panel and no maps.
    view = session.refresh(engine)
    assert view.explain is None and session.result.coarse is None


def test_image_features_are_computed_once_per_image(model, engine, image) -> None:
    encoder_calls = []
    handle = model.vision_encoder.register_forward_hook(lambda *_: encoder_calls.append(1))
    try:
        session = Session()
        session.load(engine, image)
        assert len(encoder_calls) == 1 and engine.cache.misses == 1
        session.click(engine, 64, 48)
        session.click(engine, 10, 10, BACKGROUND)
        session.click(engine, 20, 20, BOX)
        session.click(engine, 90, 80, BOX)
        assert len(encoder_calls) == 1, "a click ran the image encoder again"
        assert engine.cache.hits == 3
        # Another session uploading the same picture shares the features.
        Session().load(engine, image.copy())
        assert len(encoder_calls) == 1
        # Two other images push it out of the 2-image cache: the next click recomputes it, once.
        Session().load(engine, synthetic_image(seed=1))
        Session().load(engine, synthetic_image(seed=2))
        session.click(engine, 70, 50)
        session.click(engine, 72, 50)
        assert len(encoder_calls) == 4
    finally:
        handle.remove()


def test_sessions_keep_their_own_prompts(engine, image) -> None:
    first, second = Session(), Session()
    first.load(engine, image)
    second.load(engine, image)
    first.click(engine, 64, 48)
    second.click(engine, 10, 10, BACKGROUND)
    second.click(engine, 64, 48)
    assert first.prompt == Prompt(points=((64.0, 48.0),), labels=(1,))
    assert second.prompt.labels == (0, 1)


def test_undo_and_clear(engine, session) -> None:
    session.click(engine, 64, 48)
    session.click(engine, 20, 20, BOX)
    assert session.corner == (20.0, 20.0)
    session.click(engine, 90, 80, BOX)
    assert session.prompt.box == (20.0, 20.0, 90.0, 80.0) and session.corner is None
    session.undo(engine)
    assert session.prompt.box is None and session.corner == (20.0, 20.0)
    session.undo(engine)
    assert session.corner is None and session.prompt.points == ((64.0, 48.0),) and session.result is not None
    view = session.undo(engine)
    assert session.prompt.is_empty() and session.result is None and view.mask_file is None
    assert session.undo(engine).message == "Nothing to undo."
    session.click(engine, 64, 48)
    view = session.clear()
    assert session.prompt.is_empty() and session.result is None and view.image is not None


def test_bad_clicks_give_messages_and_change_nothing(engine, image) -> None:
    session = Session()
    assert "Upload a photo" in session.click(engine, 5, 5).message
    session.load(engine, image)
    session.click(engine, 64, 48)
    before = session.prompt
    height, width = image.shape[:2]
    for x, y in ((width, 5), (-1, 5), (5, height + 3), (float("nan"), 5)):
        view = session.click(engine, x, y)
        assert "outside the 200x150 image" in view.message
        assert session.prompt == before
    session.click(engine, 20, 20, BOX)
    view = session.click(engine, 21, 60, BOX)
    assert "no area" in view.message and session.prompt.box is None
    assert "Unknown click mode" in session.click(engine, 5, 5, "lasso").message
    assert set(CLICK_MODES) == {FOREGROUND, BACKGROUND, BOX}


def test_bad_uploads_give_the_message(engine, image, tmp_path) -> None:
    session = Session()
    text = tmp_path / "notes.png"
    text.write_text("this is not a picture\n")
    view = session.load(engine, str(text))
    assert "notes.png is not an image the page can read" in view.message
    assert session.image is None and view.image is None

    session.load(engine, image)
    truncated = tmp_path / "cut.jpg"
    PIL.Image.fromarray(synthetic_image(200, 300)).save(truncated)
    truncated.write_bytes(truncated.read_bytes()[:300])
    view = session.load(engine, str(truncated))
    assert "cut.jpg is not an image the page can read" in view.message and "previous image stays" in view.message
    assert session.image is image

    empty = tmp_path / "empty.webp"
    empty.write_bytes(b"")
    assert "not an image" in session.load(engine, str(empty)).message


def test_huge_images_are_downscaled_or_refused(engine, tmp_path) -> None:
    wide = tmp_path / "wide.png"
    PIL.Image.fromarray(synthetic_image(100, 3000)).save(wide)
    session = Session()
    view = session.load(engine, str(wide))
    assert session.image.shape == (68, 2048, 3)
    assert "3000x100 pixels" in view.message and "downscaled to 2048x68" in view.message
    assert session.click(engine, 1000, 30).mask_file is not None

    photo = tmp_path / "photo.jpg"
    PIL.Image.fromarray(synthetic_image(600, 800)).save(photo)
    loaded = read_upload(photo, max_side=100)
    assert loaded.image.shape == (75, 100, 3) and "800x600" in loaded.note
    with pytest.raises(ValueError, match=r"photo.jpg is 800x600 pixels .* up to 0 megapixels"):
        read_upload(photo, max_pixels=400_000)


def test_segment_everything_reports_progress_and_writes_coco_json(model, processor, engine, session, image) -> None:
    from transformers import pipeline

    calls = []
    picture, message, path = session.everything(
        engine, points_per_side=4, points_per_batch=6, pred_iou_thresh=0.0, stability_score_thresh=0.0,
        progress=lambda done, total: calls.append((done, total)),
    )
    assert calls == [(1, 3), (2, 3), (3, 3)]
    generator = pipeline("mask-generation", model=model, image_processor=processor.image_processor)
    expected = generator(PIL.Image.fromarray(image), points_per_batch=6, points_per_crop=4, pred_iou_thresh=0.0,
                         stability_score_thresh=0.0)
    document = json.loads(Path(path).read_text())
    assert len(document["annotations"]) == len(expected["masks"]) > 0
    assert f"{len(expected['masks'])} mask" in message
    assert picture.shape == image.shape


def test_example_images_are_procedural_and_fixed() -> None:
    first, second = example_images(), example_images()
    assert set(first) == {"thin structures", "shapes"}
    for name, picture in first.items():
        assert picture.dtype == np.uint8 and picture.ndim == 3
        assert np.array_equal(picture, second[name])


def test_default_model_is_the_demo_model_else_random(model, processor, tmp_path) -> None:
    from pasam_hf.app.models import load_app_model

    served = load_app_model(demo_dir=tmp_path / "pasam-demo" / "model")
    assert served.source == "random" and "random weights" in served.notice and "pasam convert" in served.notice
    model.save_pretrained(tmp_path / "pasam-demo" / "model")
    processor.save_pretrained(tmp_path / "pasam-demo" / "model")
    served = load_app_model(demo_dir=tmp_path / "pasam-demo" / "model")
    assert served.source == str(tmp_path / "pasam-demo" / "model") and "`pasam demo` wrote" in served.notice
    for name, tensor in model.state_dict().items():
        assert torch.equal(served.model.state_dict()[name], tensor), name
    # A model the user chose carries no notice.
    assert load_app_model(str(tmp_path / "pasam-demo" / "model")).notice is None


def test_close_deletes_the_download_files(engine, session) -> None:
    view = session.click(engine, 100, 75)
    folder = os.path.dirname(view.mask_file)
    assert os.path.isfile(view.mask_file)
    session.close()
    assert not os.path.exists(folder)
    # The session still works afterwards (a new folder).
    assert os.path.isfile(session.click(engine, 100, 80).mask_file)
