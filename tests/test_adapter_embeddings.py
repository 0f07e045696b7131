"""`PASamModel.get_adapter_embeddings` and `forward(adapter_embeddings=...)`: the guiding branch computed once per
image gives exactly the masks (and explain outputs) of the uncached call."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_config

from pasam_hf import PASamModel

IMAGE_SIZE = 128
EMBED = IMAGE_SIZE // 16
OUTPUTS = (
    "pred_masks", "iou_scores", "coarse_masks", "refined_masks", "uncertainty_maps", "pa_masks",
    "mined_point_coords", "mined_point_labels",
)


def _model(**adapter_kwargs) -> PASamModel:
    torch.manual_seed(0)
    return PASamModel(tiny_config(**adapter_kwargs)).eval()


def _pixels(batch_size: int = 2) -> torch.Tensor:
    return torch.randn(batch_size, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(0))


PROMPTS = {
    "box": {"input_boxes": torch.tensor([[[10.0, 12.0, 90.0, 100.0]], [[30.0, 5.0, 70.0, 60.0]]])},
    "points": {
        "input_points": torch.tensor([[[[40.0, 50.0], [80.0, 20.0]]], [[[60.0, 60.0], [10.0, 100.0]]]]),
        "input_labels": torch.tensor([[[1, 0]], [[1, 1]]]),
    },
    "box_and_points": {
        "input_boxes": torch.tensor([[[10.0, 12.0, 90.0, 100.0]], [[30.0, 5.0, 70.0, 60.0]]]),
        "input_points": torch.tensor([[[[40.0, 50.0]]], [[[60.0, 60.0]]]]),
        "input_labels": torch.tensor([[[0]], [[1]]]),
    },
}


@pytest.mark.parametrize("consistency_module", ["guided_gate", "cross_attention"])
@pytest.mark.parametrize("prompt", sorted(PROMPTS))
@pytest.mark.parametrize("multimask", [False, True])
def test_cached_adapter_embeddings_give_identical_outputs(consistency_module: str, prompt: str, multimask: bool):
    model = _model(consistency_module=consistency_module)
    pixels = _pixels()
    adapter_pixel_values = model.compute_adapter_pixel_values(pixels)
    with torch.no_grad():
        image_embeddings = model.get_image_embeddings(pixels)
        adapter_embeddings = model.get_adapter_embeddings(adapter_pixel_values)
        uncached = model(
            image_embeddings=image_embeddings, adapter_pixel_values=adapter_pixel_values,
            multimask_output=multimask, **PROMPTS[prompt],
        )
        cached = model(
            image_embeddings=image_embeddings, adapter_embeddings=adapter_embeddings,
            multimask_output=multimask, **PROMPTS[prompt],
        )
        from_pixels = model(pixel_values=pixels, multimask_output=multimask, **PROMPTS[prompt])
    assert cached.pred_masks.shape[2] == (3 if multimask else 1)
    for name in OUTPUTS:
        # Bit for bit: the same branch on the same input, only computed earlier.
        assert torch.equal(getattr(cached, name), getattr(uncached, name)), name
    torch.testing.assert_close(cached.pred_masks, from_pixels.pred_masks, atol=1e-5, rtol=1e-5)


def test_adapter_embeddings_shape_and_dtype() -> None:
    model = _model()
    adapter_pixel_values = model.compute_adapter_pixel_values(_pixels())
    embeddings = model.get_adapter_embeddings(adapter_pixel_values)
    hidden = model.config.mask_decoder_config.hidden_size
    assert embeddings.shape == (2, hidden, EMBED, EMBED)
    assert embeddings.dtype == model.mask_decoder.iou_token.weight.dtype
    assert not embeddings.requires_grad
    # Cell (i, j) of the map is the guiding branch's token i * w + j.
    tokens = model.mask_decoder.guiding_tokens(adapter_pixel_values)
    assert torch.equal(embeddings[:, :, 2, 3], tokens[:, 2 * EMBED + 3].detach())


def test_adapter_embeddings_errors() -> None:
    model = _model()
    pixels = _pixels()
    adapter_pixel_values = model.compute_adapter_pixel_values(pixels)
    image_embeddings = model.get_image_embeddings(pixels)
    adapter_embeddings = model.get_adapter_embeddings(adapter_pixel_values)
    with pytest.raises(ValueError, match="Only one of adapter_pixel_values and adapter_embeddings"):
        model(image_embeddings=image_embeddings, adapter_pixel_values=adapter_pixel_values,
              adapter_embeddings=adapter_embeddings, **PROMPTS["box"])
    with pytest.raises(ValueError, match="adapter_embeddings must have shape"):
        model(image_embeddings=image_embeddings, adapter_embeddings=adapter_embeddings[:1], **PROMPTS["box"])
    with pytest.raises(ValueError, match="adapter_pixel_values must have shape"):
        model.get_adapter_embeddings(torch.zeros(2, 3, 32, 32))
    with pytest.raises(ValueError, match="get_adapter_embeddings"):
        model(image_embeddings=image_embeddings, **PROMPTS["box"])
