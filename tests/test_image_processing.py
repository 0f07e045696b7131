"""The adapter input: resize and uint8 wrap identical to the release's `F.interpolate` and x86 numpy cast, and the
processor's image-region-only computation identical to the full one."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import synthetic_image
from pasam_hf import PASamConfig, PASamProcessor
from pasam_hf.image_processing_pasam import compute_adapter_pixel_values, resize_bilinear, wrap_to_uint8


@pytest.fixture
def single_thread():
    # torch's CPU interpolation kernel changes in the last bit with the thread count: compare with one thread.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize(("side", "size"), [(1024, 256), (128, 32), (64, 32), (96, 32), (100, 25), (100, 30)])
@pytest.mark.parametrize("seed", range(3))
def test_resize_bilinear_is_f_interpolate_bit_for_bit(single_thread, side: int, size: int, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    pixel_values = torch.randn(2, 3, side, side, generator=generator) * 3
    # SAM's layout: content at the top left, zero padding at the bottom (landscape photo).
    pixel_values[..., side * 9 // 16 :, :] = 0
    expected = F.interpolate(pixel_values, size=(size, size), mode="bilinear", align_corners=False)
    assert torch.equal(resize_bilinear(pixel_values, size), expected)


def test_resize_bilinear_does_not_depend_on_the_thread_count() -> None:
    pixel_values = torch.randn(2, 3, 1024, 1024, generator=torch.Generator().manual_seed(0))
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = resize_bilinear(pixel_values, 256)
        torch.set_num_threads(max(2, threads))
        several = resize_bilinear(pixel_values, 256)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, several)
    expected = F.interpolate(pixel_values, size=(256, 256), mode="bilinear", align_corners=False)
    torch.testing.assert_close(several, expected, atol=1e-6, rtol=0)


def test_resize_bilinear_keeps_float32_and_non_square_falls_back() -> None:
    pixel_values = torch.randn(1, 3, 64, 48, dtype=torch.float64)
    out = resize_bilinear(pixel_values, 16)
    assert out.dtype == torch.float32 and out.shape == (1, 3, 16, 16)
    expected = F.interpolate(pixel_values.float(), size=(16, 16), mode="bilinear", align_corners=False)
    assert torch.equal(out, expected)


def test_wrap_to_uint8_truncates_then_wraps() -> None:
    values = torch.tensor([-1.3, 2.4, -0.2, 0.0, 255.9, 256.2, -256.5, -257.9, 1000.7, 3e9, -3e9 - 512])
    expected = np.mod(np.trunc(values.double().numpy()).astype(np.int64), 256).astype(np.uint8)
    assert wrap_to_uint8(values).numpy().tolist() == expected.tolist()
    assert wrap_to_uint8(torch.tensor([-1.3, 2.4])).tolist() == [255, 2]
    # Arrays in, arrays out: the same cast.
    as_array = wrap_to_uint8(values.numpy())
    assert isinstance(as_array, np.ndarray) and as_array.dtype == np.uint8 and as_array.tolist() == expected.tolist()


def _sam_sized_processor() -> PASamProcessor:
    # SAM's 1024 input and 256 adapter side: the sizes the region-only path is written for.
    return PASamProcessor.from_model_config(PASamConfig())


def _assert_processor_matches_full_computation(processor: PASamProcessor, image: np.ndarray, edge_mode: str) -> None:
    encoding = processor(images=image, return_tensors="pt", edge_mode=edge_mode)
    full = compute_adapter_pixel_values(encoding["pixel_values"], edge_mode=edge_mode)
    assert torch.equal(encoding["adapter_pixel_values"], full), (image.shape, edge_mode)


@pytest.mark.parametrize("edge_mode", ["official", "rgb"])
@pytest.mark.parametrize(
    ("height", "width"), [(96, 128), (97, 1023), (1023, 97), (301, 299), (5, 7), (64, 64), (513, 1024), (600, 599)]
)
def test_processor_region_only_adapter_input_equals_the_full_computation(
    height: int, width: int, edge_mode: str
) -> None:
    # Sizes whose resized side is not a multiple of the 4x factor put a 2 x 2 block across the padding border.
    image = synthetic_image(height, width, seed=height + width)
    _assert_processor_matches_full_computation(_sam_sized_processor(), image, edge_mode)


def test_processor_region_only_adapter_input_on_real_photos(shared_data) -> None:
    from PIL import Image

    photos = sorted((shared_data / "davis345").rglob("*.jpg"))[::40] + sorted((shared_data / "hq-fixture").rglob("*.jpg"))
    if not photos:
        pytest.skip("no photos in the shared data")
    processor = _sam_sized_processor()
    for path in photos:
        image = np.asarray(Image.open(path).convert("RGB"))
        for edge_mode in ("official", "rgb"):
            _assert_processor_matches_full_computation(processor, image, edge_mode)


def test_region_only_path_checks_its_sizes_and_batches() -> None:
    processor = _sam_sized_processor()
    images = [synthetic_image(200, 300, seed=1), synthetic_image(300, 150, seed=2)]
    encoding = processor(images=images, return_tensors="pt")
    full = compute_adapter_pixel_values(encoding["pixel_values"])
    assert torch.equal(encoding["adapter_pixel_values"], full)
    assert torch.equal(
        compute_adapter_pixel_values(encoding["pixel_values"], valid_sizes=encoding["reshaped_input_sizes"]), full
    )
    with pytest.raises(ValueError, match="valid_sizes has 1 entries for 2 images"):
        compute_adapter_pixel_values(encoding["pixel_values"], valid_sizes=[[200, 300]])


@pytest.mark.parametrize(
    ("return_tensors", "options"),
    [
        ("pt", {}),
        (None, {}),
        ("pt", {"do_pad": False}),
        ("pt", {"do_normalize": False}),
        ("pt", {"image_mean": [0.2, 0.3, 0.4], "image_std": [0.5, 0.6, 0.7]}),
    ],
)
def test_sam_outputs_are_sams_exactly(return_tensors, options) -> None:
    """PA-SAM's processor pads in place into one batch tensor: every output SAM's processor gives is the same,
    values, dtypes and types, for a batch of differently shaped images with segmentation maps."""
    images = [synthetic_image(200, 300, seed=1), synthetic_image(300, 150, seed=2), synthetic_image(64, 64, seed=3)]
    if options.get("do_pad") is False:
        images = images[:1]  # unpadded images of different sizes do not stack
    _assert_same_as_sams(images, return_tensors, options)


@pytest.mark.parametrize(
    ("shapes", "options"),
    [
        # Shrinking (the antialiased kernel's wide filter), odd sides, portrait and a 7-pixel-high strip.
        ([(1500, 1100), (1201, 777), (333, 1999), (7, 1900)], {}),
        ([(1500, 1100), (1201, 777)], {"do_pad": False, "disable_grouping": True}),
        # Same-shaped images stacked into one resize call.
        ([(480, 854), (480, 854), (1080, 1920)], {"disable_grouping": False}),
    ],
)
def test_resized_images_are_sams_from_the_channels_last_view(shapes, options) -> None:
    """`process_image` hands the resize a channels-last view instead of SAM's contiguous copy: the same bytes for
    shrinking and enlarging, odd sizes and grouped batches."""
    images = [synthetic_image(height, width, seed=index) for index, (height, width) in enumerate(shapes)]
    if options.get("do_pad") is False:
        images = images[:1]
    _assert_same_as_sams(images, "pt", options)


def test_process_image_keeps_the_callers_pixels_as_a_channels_last_view() -> None:
    pytest.importorskip("torchvision")
    from transformers.image_utils import ChannelDimension

    image = synthetic_image(50, 70, seed=0)
    tensor = _sam_sized_processor().image_processor.process_image(image, input_data_format=ChannelDimension.LAST)
    assert tensor.shape == (3, 50, 70) and tensor.dtype == torch.uint8
    assert tensor.data_ptr() == image.__array_interface__["data"][0] and tensor.permute(1, 2, 0).is_contiguous()
    assert np.array_equal(tensor.permute(1, 2, 0).numpy(), image)


def test_real_photos_preprocess_as_sams(shared_data) -> None:
    from PIL import Image

    photos = sorted((shared_data / "davis345").rglob("*.jpg"))[::50] + sorted((shared_data / "hq-fixture").rglob("*.jpg"))
    if not photos:
        pytest.skip("no photos in the shared data")
    for path in photos:
        with Image.open(path) as opened:
            _assert_same_as_sams([np.array(opened.convert("RGB"))], "pt", {})


def _assert_same_as_sams(images: list[np.ndarray], return_tensors, options: dict) -> None:
    """Every output of SAM's processor (images, segmentation maps and a box each) equals PA-SAM's: values, dtypes
    and types."""
    pytest.importorskip("torchvision")
    from transformers import SamProcessor
    from transformers.models.sam.image_processing_sam import SamImageProcessor

    from pasam_hf import PASamImageProcessor

    processor = _sam_sized_processor()
    assert isinstance(processor.image_processor, PASamImageProcessor)
    sizes = {key: getattr(processor.image_processor, key) for key in ("size", "pad_size", "mask_size", "mask_pad_size")}
    sam = SamProcessor(image_processor=SamImageProcessor(**sizes))
    maps = [(image[..., 0] > 128).astype(np.uint8) for image in images]
    boxes = [[[0.0, 0.0, image.shape[1] * 0.5, image.shape[0] * 0.5 + 1]] for image in images]
    ours = processor(images=images, segmentation_maps=maps, input_boxes=boxes, return_tensors=return_tensors, **options)
    theirs = sam(images=images, segmentation_maps=maps, input_boxes=boxes, return_tensors=return_tensors, **options)
    assert set(theirs) <= set(ours) and "adapter_pixel_values" in ours
    for key in theirs:
        a, b = ours[key], theirs[key]
        assert type(a) is type(b), key
        for x, y in zip(a, b) if isinstance(b, list) else [(a, b)]:
            if torch.is_tensor(y):
                assert x.dtype == y.dtype and torch.equal(x, y), key
            else:
                assert np.array_equal(np.asarray(x), np.asarray(y)), key


def test_too_large_image_for_the_pad_size_gets_sams_error() -> None:
    pytest.importorskip("torchvision")
    processor = _sam_sized_processor()
    with pytest.raises(ValueError, match="Padding dimensions are negative"):
        processor(images=synthetic_image(200, 300, seed=1), do_resize=False, pad_size={"height": 128, "width": 128},
                  return_tensors="pt")
