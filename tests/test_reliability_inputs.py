"""Reliability of image and prompt inputs: every kind of image is handled identically or rejected with a ValueError
naming it; prompts are checked against their image (docs/reliability.md lists the rules tested here)."""

from __future__ import annotations

import time
import tracemalloc
import warnings

import numpy as np
import pytest
import torch
from conftest import synthetic_image
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from PIL import Image

from pasam_hf import PASamConfig, PASamImageProcessorPil, PASamProcessor
from pasam_hf.validation import PromptClippedWarning, prepare_images, to_rgb_uint8, validate_prompts

PROPERTY_SETTINGS = settings(
    max_examples=50, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow]
)
BOX = [[[10.0, 8.0, 50.0, 30.0]]]


def _pixels(processor: PASamProcessor, images, **kwargs) -> dict:
    return processor(images=images, return_tensors="pt", **kwargs)


def _assert_same_inputs(a: dict, b: dict, what: str = "") -> None:
    for key in ("pixel_values", "adapter_pixel_values", "original_sizes", "reshaped_input_sizes"):
        assert torch.equal(a[key], b[key]), f"{what}: {key}"


def _masks(model, inputs: dict) -> torch.Tensor:
    keys = ("pixel_values", "adapter_pixel_values", "input_points", "input_labels", "input_boxes")
    with torch.no_grad():
        return model(**{key: inputs[key] for key in keys if key in inputs}).pred_masks


# ------------------------------------------------------------------------------------------------ image kinds


def test_every_image_kind_gives_identical_model_inputs(processor) -> None:
    rgb = synthetic_image(40, 60)
    reference = _pixels(processor, rgb)
    variants = {
        "PIL RGB": Image.fromarray(rgb),
        "numpy CHW": np.ascontiguousarray(rgb.transpose(2, 0, 1)),
        "torch CHW": torch.from_numpy(rgb).permute(2, 0, 1),
        "float tensor requiring grad": torch.from_numpy(rgb).permute(2, 0, 1).float().requires_grad_() / 255,
        "float64 in [0, 1]": rgb / 255.0,
        "float32 in [0, 255]": rgb.astype(np.float32),
        "float16 in [0, 1]": (rgb / 255.0).astype(np.float16),
        "uint16 (16-bit range)": rgb.astype(np.uint16) * 257,
        "int64 in [0, 255]": rgb.astype(np.int64),
        "RGBA, opaque": np.concatenate([rgb, np.full(rgb.shape[:2] + (1,), 255, np.uint8)], axis=-1),
        "PIL RGBA, opaque": Image.fromarray(rgb).convert("RGBA"),
        "4-D batch of one": rgb[None],
    }
    for name, image in variants.items():
        _assert_same_inputs(_pixels(processor, image), reference, name)


def test_pil_backend_gets_the_same_normalisation(processor) -> None:
    pil_processor = PASamProcessor(image_processor=PASamImageProcessorPil(**processor.image_processor.to_dict()))
    rgb = synthetic_image(30, 20)
    for image in (rgb / 255.0, rgb.astype(np.uint16) * 257, torch.from_numpy(rgb).permute(2, 0, 1)):
        torch.testing.assert_close(
            _pixels(pil_processor, image)["pixel_values"], _pixels(processor, rgb)["pixel_values"], atol=1e-5, rtol=0
        )


def test_grayscale_palette_and_mode_conversions(processor) -> None:
    rgb = synthetic_image(24, 32)
    gray = rgb[..., 0]
    as_rgb = _pixels(processor, np.repeat(gray[..., None], 3, axis=-1))
    for image in (gray, gray[..., None], gray[None], Image.fromarray(gray), torch.from_numpy(gray)):
        _assert_same_inputs(_pixels(processor, image), as_rgb)
    # 16-bit grayscale keeps its full range (PIL would clip "I;16" to 255 when converting to RGB).
    wide = Image.fromarray(gray.astype(np.uint16) * 257)
    _assert_same_inputs(_pixels(processor, wide), as_rgb)
    palette = Image.fromarray(rgb).convert("P")
    _assert_same_inputs(_pixels(processor, palette), _pixels(processor, palette.convert("RGB")))
    binary = gray > 100
    _assert_same_inputs(_pixels(processor, binary), _pixels(processor, binary.astype(np.uint8) * 255))
    cmyk = Image.fromarray(rgb).convert("CMYK")
    _assert_same_inputs(_pixels(processor, cmyk), _pixels(processor, cmyk.convert("RGB")))


def test_transparency_is_composited_onto_white(processor) -> None:
    rgba = np.zeros((10, 12, 4), np.uint8)  # fully transparent black
    white = np.full((10, 12, 3), 255, np.uint8)
    for image in (rgba, Image.fromarray(rgba, "RGBA"), torch.from_numpy(rgba).permute(2, 0, 1)):
        _assert_same_inputs(_pixels(processor, image), _pixels(processor, white))


def test_exif_orientation_is_applied(tmp_path, processor) -> None:
    rgb = synthetic_image(40, 64)
    path = tmp_path / "rotated.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    Image.fromarray(rgb).save(path, exif=exif, quality=95)
    with Image.open(path) as opened:
        opened.load()
        upright = np.array(opened.transpose(Image.Transpose.ROTATE_270))
        from_pil = _pixels(processor, opened)
    assert upright.shape[:2] == (64, 40)
    from_path = _pixels(processor, str(path))
    assert from_path["original_sizes"].tolist() == [[64, 40]]
    _assert_same_inputs(from_path, _pixels(processor, upright))
    _assert_same_inputs(from_pil, from_path)


def test_tiny_images_and_ambiguous_layouts(model, processor) -> None:
    one = np.array([[[200, 30, 10]]], np.uint8)
    for image in (one, Image.fromarray(one), torch.from_numpy(one).permute(2, 0, 1)):
        inputs = _pixels(processor, image, input_boxes=[[[0, 0, 1, 1]]])
        assert inputs["original_sizes"].tolist() == [[1, 1]]
        masks = processor.post_process_masks(_masks(model, inputs), inputs["original_sizes"],
                                             inputs["reshaped_input_sizes"])
        assert masks[0].shape == (1, 1, 1, 1)
    # Both axes could hold 3 channels: numpy arrays are read as (H, W, C), tensors as (C, H, W), unless told.
    array = np.arange(45, dtype=np.uint8).reshape(3, 5, 3)
    assert to_rgb_uint8(array).shape == (3, 5, 3)
    assert to_rgb_uint8(torch.from_numpy(array)).shape == (5, 3, 3)
    assert to_rgb_uint8(array, data_format="channels_first").shape == (5, 3, 3)
    assert np.shares_memory(to_rgb_uint8(array), array)  # uint8 RGB is used as is, never copied


def test_huge_image_is_resized_without_a_float_copy() -> None:
    processor = PASamProcessor.from_model_config(PASamConfig())  # the real 1024 input
    image = np.zeros((10000, 8000, 3), np.uint8)
    image[::50] = 255
    start = time.perf_counter()
    inputs = processor(images=image, input_boxes=[[[100, 100, 7000, 9000]]], return_tensors="pt")
    assert time.perf_counter() - start < 10
    assert inputs["pixel_values"].shape == (1, 3, 1024, 1024)
    assert inputs["reshaped_input_sizes"].tolist() == [[1024, 819]]
    # Converting a large float image to uint8 works in bands: no full-size float64 (or float32) copy is made.
    floats = np.random.default_rng(0).random((3000, 2000, 3), dtype=np.float32)
    tracemalloc.start()
    converted = to_rgb_uint8(floats)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert converted.dtype == np.uint8
    assert peak < converted.nbytes + floats.nbytes // 2, f"peak {peak / 2**20:.0f} MiB"


BAD_IMAGES = {
    "NaN": (np.full((8, 8, 3), np.nan, np.float32), "NaN"),
    "infinity": (np.full((8, 8), np.inf), "NaN or infinite"),
    "normalised floats": (np.full((8, 8, 3), -1.5, np.float32), "normalised"),
    "floats above 255": (np.full((8, 8, 3), 300.0), "neither [0, 1] nor [0, 255]"),
    "negative ints": (np.full((8, 8, 3), -3, np.int16), "neither [0, 1] nor [0, 255]"),
    "32-bit ints": (np.full((8, 8, 3), 70000, np.int32), "neither [0, 1] nor [0, 255]"),
    "5 channels": (np.zeros((8, 8, 5), np.uint8), "colour channels"),
    "2 channels": (np.zeros((8, 8, 2), np.uint8), "colour channels"),
    "empty": (np.zeros((0, 8, 3), np.uint8), "no pixels"),
    "5-D": (np.zeros((1, 1, 8, 8, 3), np.uint8), "dimensions"),
    "1-D": (np.zeros(8, np.uint8), "dimensions"),
    "complex": (np.zeros((8, 8, 3), np.complex64), "not a pixel type"),
    "object": (np.empty((8, 8, 3), dtype=object), "not a pixel type"),
    "int": (3, "is a int"),
    "nested list of pixels": ([[0, 0], [0, 0]], "nested lists"),
    "missing file": ("no/such/image.png", "not a file"),
    "too elongated": (np.zeros((1, 5000, 3), np.uint8), "aspect ratio"),
    "wrong explicit layout": (np.zeros((8, 9, 3), np.uint8), "input_data_format"),
}


@pytest.mark.parametrize("case", sorted(BAD_IMAGES))
def test_bad_images_raise_a_value_error_naming_them(case: str, processor) -> None:
    bad, expected = BAD_IMAGES[case]
    kwargs = {"input_data_format": "channels_first"} if case == "wrong explicit layout" else {}
    good = synthetic_image(8, 8).transpose(2, 0, 1) if kwargs else synthetic_image(8, 8)
    with pytest.raises(ValueError, match="images\\[1\\]") as raised:
        processor(images=[good, bad], return_tensors="pt", **kwargs)
    assert expected in str(raised.value)


def test_unreadable_files_raise_a_value_error_naming_them(tmp_path, processor) -> None:
    garbage = tmp_path / "garbage.png"
    garbage.write_bytes(b"not an image at all")
    truncated = tmp_path / "truncated.png"
    Image.fromarray(synthetic_image(64, 64)).save(tmp_path / "whole.png")
    truncated.write_bytes((tmp_path / "whole.png").read_bytes()[:300])
    for path in (garbage, truncated):
        with pytest.raises(ValueError, match=f"images\\[0\\] .*{path.name}.*(corrupt|truncated)"):
            processor(images=str(path), return_tensors="pt")
    with pytest.raises(ValueError, match="images is required"):
        processor(images=None)
    with pytest.raises(ValueError, match="empty list"):
        processor(images=[])


def test_image_processor_alone_normalises_too(processor) -> None:
    """The mask-generation pipeline calls the image processor directly."""
    rgb = synthetic_image(20, 30)
    direct = processor.image_processor(rgb / 255.0, return_tensors="pt")
    assert torch.equal(direct["pixel_values"], processor.image_processor(rgb, return_tensors="pt")["pixel_values"])
    with pytest.raises(ValueError, match="images\\[0\\] contains NaN"):
        processor.image_processor(np.full((4, 4, 3), np.nan), return_tensors="pt")


# ----------------------------------------------------------------------------------------------------- prompts


def test_box_partly_outside_is_clipped_with_a_warning(processor) -> None:
    image = synthetic_image(40, 60)
    with pytest.warns(PromptClippedWarning, match="input_boxes\\[0\\]\\[0\\]"):
        clipped = _pixels(processor, image, input_boxes=[[[-20.0, 5.0, 80.0, 30.0]]])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        inside = _pixels(processor, image, input_boxes=[[[0.0, 5.0, 60.0, 30.0]]])
    assert torch.equal(clipped["input_boxes"], inside["input_boxes"])


BAD_BOXES = {
    "inverted x": ([[[50, 5, 10, 30]]], "input_boxes\\[0\\]\\[0\\] .*x1 < x0"),
    "inverted y": ([[[5, 30, 10, 5]]], "x1 < x0 or y1 < y0"),
    "zero area": ([[[10, 10, 10, 30]]], "zero area"),
    "fully outside": ([[[100, 100, 200, 200]]], "entirely outside"),
    "touching the edge only": ([[[60, 0, 90, 10]]], "entirely outside"),
    "NaN": ([[[np.nan, 5, 10, 30]]], "finite"),
    "infinity": ([[[0, 5, np.inf, 30]]], "finite"),
    "five numbers": ([[[0, 5, 10, 30, 1]]], "\\[x0, y0, x1, y1\\]"),
    "not nested enough": ([[0, 5, 10, 30]], "3 levels deep"),
    "a string": ([[["a", 5, 10, 30]]], "numbers only"),
    "empty": ([], "empty"),
    "one image without boxes": ([[]], "levels deep|at least one prompt"),
    "boxes for two images": ([[[0, 0, 5, 5]], [[0, 0, 5, 5]]], "prompts for 2 images but 1"),
}


@pytest.mark.parametrize("case", sorted(BAD_BOXES))
def test_bad_boxes_raise(case: str, processor) -> None:
    boxes, expected = BAD_BOXES[case]
    with pytest.raises(ValueError, match=expected):
        _pixels(processor, synthetic_image(40, 60), input_boxes=boxes)


BAD_POINTS = {
    "outside": (dict(input_points=[[[70, 10]]]), "outside the 60x40"),
    "negative": (dict(input_points=[[[-1, 10]]]), "outside"),
    "NaN": (dict(input_points=[[[np.nan, 10]]]), "finite"),
    "more labels than points": (dict(input_points=[[[1, 1]]], input_labels=[[1, 0]]), "2 labels but its points"),
    "fewer labels": (dict(input_points=[[[[1, 1], [2, 2]]]], input_labels=[[[1]]]), "1 labels but its points have 2"),
    "labels without points": (dict(input_labels=[[1]]), "without input_points"),
    "unknown label": (dict(input_points=[[[1, 1]]], input_labels=[[2]]), "point labels are 1"),
    "label nesting": (dict(input_points=[[[[1, 1]]]], input_labels=[[1]]), "input_labels is nested 2"),
    "3 coordinates": (dict(input_points=[[[1, 1, 1]]]), "\\[x, y\\]"),
    "uneven prompts per image": (
        dict(images=2, input_points=[[[[1, 1]]], [[[1, 1]], [[2, 2]]]]), "different number of prompts per image"),
    "uneven boxes per image": (
        dict(images=2, input_boxes=[[[0, 0, 5, 5]], [[0, 0, 5, 5], [1, 1, 6, 6]]]), "different number"),
    "points and boxes disagree": (
        dict(input_points=[[[[1, 1]], [[2, 2]]]], input_boxes=[[[0, 0, 5, 5]]]), "different numbers of prompts"),
    "mixed nesting": (dict(images=2, input_points=[[[1, 1]], [[[1, 1]]]]), "nested differently"),
}


@pytest.mark.parametrize("case", sorted(BAD_POINTS))
def test_bad_points_raise(case: str, processor) -> None:
    kwargs, expected = BAD_POINTS[case]
    kwargs = dict(kwargs)
    images = [synthetic_image(40, 60)] * kwargs.pop("images", 1)
    with pytest.raises(ValueError, match=expected):
        _pixels(processor, images, **kwargs)


def test_points_on_the_border_and_prompts_as_arrays(processor) -> None:
    image = synthetic_image(40, 60)
    from_lists = _pixels(processor, image, input_points=[[[0, 0], [60, 40]]], input_labels=[[1, 0]], input_boxes=BOX)
    from_arrays = _pixels(
        processor, image,
        input_points=torch.tensor([[[0.0, 0.0], [60.0, 40.0]]]),
        input_labels=np.array([[1, 0]]),
        input_boxes=np.array(BOX),
    )
    for key in ("input_points", "input_labels", "input_boxes"):
        assert torch.equal(from_lists[key].double(), from_arrays[key].double()), key


def test_points_without_labels_are_foreground(model, processor) -> None:
    image = synthetic_image(40, 60)
    implicit = _pixels(processor, image, input_points=[[[30, 20]]])
    explicit = _pixels(processor, image, input_points=[[[30, 20]]], input_labels=[[1]])
    assert implicit["input_labels"].tolist() == [[[1]]]
    assert torch.equal(_masks(model, implicit), _masks(model, explicit))


def test_ragged_points_are_padded_and_give_the_per_image_masks(model, processor) -> None:
    images = [synthetic_image(40, 60, seed=1), synthetic_image(50, 30, seed=2)]
    points = [[[[30, 20]]], [[[10, 10], [20, 40], [5, 5]]]]
    labels = [[[1]], [[1, 1, 0]]]
    batched = _pixels(processor, images, input_points=points, input_labels=labels)
    assert batched["input_points"].shape == (2, 1, 3, 2)
    assert batched["input_labels"][0].tolist() == [[1, -10, -10]]
    assert (batched["input_points"][0, 0, 1:] == -10).all()
    together = _masks(model, batched)
    for index, image in enumerate(images):
        alone = _masks(model, _pixels(processor, image, input_points=[points[index]], input_labels=[labels[index]]))
        torch.testing.assert_close(together[index : index + 1], alone, atol=1e-4, rtol=1e-4)


def test_no_prompt_prepares_images_only_and_the_model_refuses_to_guess(model, processor) -> None:
    inputs = _pixels(processor, synthetic_image(40, 60))
    assert not {"input_points", "input_labels", "input_boxes"} & set(inputs)
    with pytest.raises(ValueError, match="needs a prompt"):
        _masks(model, inputs)


# ------------------------------------------------------------------------------------------- property tests

DTYPES = [np.uint8, np.uint16, np.int16, np.int64, np.bool_, np.float16, np.float32, np.float64]


@st.composite
def any_array_image(draw):
    """Arrays and tensors of every dtype, layout and channel count; values in the valid range half of the time,
    anywhere (NaN, infinity, negative, huge) otherwise."""
    dtype = np.dtype(draw(st.sampled_from(DTYPES)))
    height, width = draw(st.integers(1, 24)), draw(st.integers(1, 24))
    layout = draw(st.sampled_from(["hw", "hwc", "chw"]))
    channels = draw(st.sampled_from([1, 3, 3, 4, 2, 5]))
    shape = {"hw": (height, width), "hwc": (height, width, channels), "chw": (channels, height, width)}[layout]
    if draw(st.booleans()):
        elements = hnp.from_dtype(dtype, allow_subnormal=False)
    elif dtype.kind == "f":
        elements = st.floats(0, draw(st.sampled_from([1.0, 255.0])), width=min(32, 8 * dtype.itemsize))
    elif dtype.kind in "iu":
        elements = st.integers(0, 255 if dtype != np.uint16 else 65535)
    else:
        elements = st.booleans()
    array = draw(hnp.arrays(dtype, shape, elements=elements))
    if draw(st.booleans()) and dtype != np.uint16:  # the same as a torch tensor (torch has few uint16 kernels)
        return torch.from_numpy(array)
    return array


@PROPERTY_SETTINGS
@given(image=any_array_image())
def test_property_images_are_handled_or_rejected_clearly(image, processor) -> None:
    try:
        inputs = _pixels(processor, image)
    except ValueError as error:
        assert "images[0]" in str(error)
        event("rejected")
        return
    event("accepted")
    assert inputs["pixel_values"].shape == (1, 3, 128, 128)
    assert torch.isfinite(inputs["pixel_values"]).all()
    assert torch.isfinite(inputs["adapter_pixel_values"]).all()
    assert (inputs["original_sizes"] >= 1).all()


@PROPERTY_SETTINGS
@given(image=hnp.arrays(np.uint8, st.tuples(st.integers(1, 20), st.integers(1, 20), st.just(3))))
def test_property_value_ranges_and_layouts_agree(image, processor) -> None:
    reference = _pixels(processor, image)
    variants = [image / 255.0, image.astype(np.uint16) * 257, torch.from_numpy(image).permute(2, 0, 1)]
    if image.max() > 1:  # floats whose maximum is <= 1 are read as [0, 1] (documented)
        variants.append(image.astype(np.float32))
    for variant in variants:
        _assert_same_inputs(_pixels(processor, variant), reference)


def coordinate(size: int, corrupt: bool) -> st.SearchStrategy[float]:
    """Inside the image; when `corrupt`, also just outside, NaN, infinite or absurd."""
    inside = st.floats(0, size)
    if not corrupt:
        return inside
    return st.one_of(inside, st.floats(-0.5 * size, 1.5 * size), st.sampled_from([np.nan, np.inf, -np.inf, 1e9]))


@st.composite
def any_prompts(draw):
    """Batches of 1-2 images with boxes and/or ragged point groups; one example in three has corrupt coordinates
    (outside, inverted, non-finite), uneven prompt counts or wrong labels."""
    corrupt = draw(st.integers(0, 2)) == 0
    num_images = draw(st.integers(1, 2))
    sizes = [(draw(st.integers(1, 80)), draw(st.integers(1, 80))) for _ in range(num_images)]
    prompts_per_image = [draw(st.integers(1, 2))] * num_images
    if corrupt and draw(st.booleans()):
        prompts_per_image = [draw(st.integers(1, 2)) for _ in range(num_images)]
    kwargs = {}

    def box(height: int, width: int) -> list[float]:
        xs = [draw(coordinate(width, corrupt)) for _ in range(2)]
        ys = [draw(coordinate(height, corrupt)) for _ in range(2)]
        if not corrupt:
            xs, ys = sorted(xs), sorted(ys)
            if xs[1] - xs[0] < 0.01 or ys[1] - ys[0] < 0.01:  # (almost) zero area is a corrupt box
                xs, ys = [0.0, float(width)], [0.0, float(height)]
        return [xs[0], ys[0], xs[1], ys[1]]

    if draw(st.booleans()):
        kwargs["input_boxes"] = [[box(h, w) for _ in range(n)] for n, (h, w) in zip(prompts_per_image, sizes)]
    if draw(st.booleans()) or not kwargs:
        groups = [
            [[[draw(coordinate(w, corrupt)), draw(coordinate(h, corrupt))] for _ in range(draw(st.integers(1, 3)))]
             for _ in range(n)]
            for n, (h, w) in zip(prompts_per_image, sizes)
        ]
        kwargs["input_points"] = groups
        if draw(st.booleans()):
            wrong = corrupt and draw(st.booleans())
            kwargs["input_labels"] = [
                [[draw(st.sampled_from([0, 1, 2] if wrong else [0, 1])) for _ in group[: len(group) - wrong]]
                 for group in image_groups]
                for image_groups in groups
            ]
    return sizes, kwargs


@PROPERTY_SETTINGS
@given(case=any_prompts())
def test_property_prompts_are_handled_or_rejected_clearly(case, model, processor) -> None:
    sizes, kwargs = case
    images = [synthetic_image(height, width) for height, width in sizes]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", PromptClippedWarning)
            inputs = _pixels(processor, images, **kwargs)
    except ValueError as error:
        assert "input_" in str(error)
        event("rejected")
        return
    event("accepted")
    side = processor.image_processor.size["longest_edge"]
    if "input_boxes" in inputs:
        boxes = inputs["input_boxes"]
        assert torch.isfinite(boxes).all() and (boxes >= 0).all() and (boxes <= side).all()
        assert (boxes[..., 2] > boxes[..., 0]).all() and (boxes[..., 3] > boxes[..., 1]).all()
    if "input_points" in inputs:
        real = inputs["input_labels"] >= 0
        assert ((inputs["input_points"] >= 0) & (inputs["input_points"] <= side))[real].all()
        assert set(inputs["input_labels"].unique().tolist()) <= {0, 1, -10}
    assert torch.isfinite(_masks(model, inputs)).all()


def test_validate_prompts_is_usable_on_its_own() -> None:
    """The inference helpers call it directly with the sizes of prepared images."""
    images = prepare_images([synthetic_image(40, 60), synthetic_image(30, 30)])
    prompts = validate_prompts([image.shape[:2] for image in images], input_points=[[[1, 2]], [[3, 4], [5, 6]]])
    assert prompts.points.shape == (2, 1, 2, 2) and prompts.labels.tolist() == [[[1, -10]], [[1, 1]]]
    assert prompts.boxes is None


def test_real_photos_with_tight_boxes(shared_data, hq_fixture, model, processor) -> None:
    """The hq-fixture photos (JPEG, as files and as PIL images) with the evaluation's tight GT boxes."""
    items = hq_fixture
    root = shared_data / "hq-fixture"
    for item in items:
        mask = np.asarray(Image.open(root / item["mask"])) > 128
        rows, cols = np.nonzero(mask)
        box = [[[float(cols.min()), float(rows.min()), float(cols.max()), float(rows.max())]]]
        with warnings.catch_warnings():
            warnings.simplefilter("error", PromptClippedWarning)  # tight GT boxes lie inside their image
            from_path = _pixels(processor, str(root / item["image"]), input_boxes=box)
        with Image.open(root / item["image"]) as photo:
            _assert_same_inputs(_pixels(processor, photo, input_boxes=box), from_path, item["id"])
        assert from_path["original_sizes"].tolist() == [[item["height"], item["width"]]]
        assert torch.isfinite(_masks(model, from_path)).all()
