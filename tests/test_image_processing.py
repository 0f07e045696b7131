"""The adapter input's resize and uint8 wrap: identical to the release's `F.interpolate` and x86 numpy cast."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pasam_hf.image_processing_pasam import resize_bilinear, wrap_to_uint8


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
