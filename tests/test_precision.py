"""Half-precision loading: with `config.decoder_in_fp32` (default) only the image encoder takes bf16/fp16, the prompt
side stays float32; `to_inference_dtype` does the same for a model in memory; the pipeline runs on such a model."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image
from transformers import pipeline

from pasam_hf import PASamConfig, PASamModel, PASamProcessor

HALF = [torch.bfloat16, torch.float16]


@pytest.fixture
def saved(tmp_path: Path, model: PASamModel, processor: PASamProcessor) -> Path:
    model.save_pretrained(tmp_path / "model")
    processor.save_pretrained(tmp_path / "model")
    return tmp_path / "model"


def _dtypes(model: PASamModel) -> dict[str, set[torch.dtype]]:
    return {
        name: {parameter.dtype for parameter in getattr(model, name).parameters()} | {
            buffer.dtype for buffer in getattr(model, name).buffers() if buffer.is_floating_point()
        }
        for name in ("vision_encoder", *PASamModel.PROMPT_SIDE_MODULES)
    }


def _inputs(processor: PASamProcessor, image) -> dict:
    encoding = processor(images=image, input_boxes=[[[10, 10, 100, 80], [30, 20, 90, 70]]], return_tensors="pt")
    return {key: encoding[key] for key in ("pixel_values", "adapter_pixel_values", "input_boxes")}


@pytest.mark.parametrize("dtype", HALF)
def test_from_pretrained_in_half_precision_keeps_the_prompt_side_in_fp32(saved, model, processor, image, dtype):
    loaded = PASamModel.from_pretrained(saved, dtype=dtype).eval()
    dtypes = _dtypes(loaded)
    assert dtypes.pop("vision_encoder") == {dtype}
    assert all(found == {torch.float32} for found in dtypes.values()), dtypes
    for name in PASamModel.PROMPT_SIDE_MODULES:  # loaded as saved, not rounded through the low dtype
        expected_state = getattr(model, name).state_dict()
        assert all(torch.equal(v, expected_state[k]) for k, v in getattr(loaded, name).state_dict().items()), name
    inputs = _inputs(processor, image)
    with torch.inference_mode():
        # Inputs in the low dtype (what BatchFeature.to(dtype) gives) or left in fp32: both are accepted.
        low = loaded(**{key: value.to(dtype) for key, value in inputs.items()})
        as_is = loaded(**inputs)
        # The prompt side computes in fp32: it is the fp32 model fed with the half-precision image embeddings.
        embeddings = loaded.get_image_embeddings(inputs["pixel_values"])
        expected = model(image_embeddings=embeddings.float(), input_boxes=inputs["input_boxes"],
                         adapter_pixel_values=inputs["adapter_pixel_values"])
    assert embeddings.dtype == dtype
    assert as_is.pred_masks.dtype == torch.float32
    torch.testing.assert_close(as_is.pred_masks, expected.pred_masks, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(as_is.iou_scores, expected.iou_scores, atol=1e-5, rtol=1e-5)
    # Boxes cast to the low dtype lose a little precision before the prompt encoder: close, not equal.
    assert ((low.pred_masks > 0) == (as_is.pred_masks > 0)).float().mean() > 0.95


def test_decoder_in_fp32_off_casts_everything(tmp_path, processor, image):
    config = PASamConfig.small(image_size=128, hidden_size=32)
    config.decoder_in_fp32 = False
    PASamModel(config).save_pretrained(tmp_path / "model")
    loaded = PASamModel.from_pretrained(tmp_path / "model", dtype=torch.bfloat16).eval()
    assert loaded.config.decoder_in_fp32 is False
    assert all(found == {torch.bfloat16} for found in _dtypes(loaded).values())
    with torch.inference_mode():
        outputs = loaded(**{key: value.to(torch.bfloat16) for key, value in _inputs(processor, image).items()})
    assert outputs.pred_masks.dtype == torch.bfloat16


@pytest.mark.parametrize("dtype", HALF)
def test_to_inference_dtype_matches_from_pretrained(saved, model, processor, image, dtype):
    loaded = PASamModel.from_pretrained(saved, dtype=dtype).eval()
    cast = PASamModel.from_pretrained(saved).eval().to_inference_dtype(dtype)
    assert _dtypes(cast) == _dtypes(loaded)
    inputs = _inputs(processor, image)
    with torch.inference_mode():
        torch.testing.assert_close(cast(**inputs).pred_masks, loaded(**inputs).pred_masks, atol=0, rtol=0)
    # fp32 is fp32 everywhere; a plain .to(dtype) still casts everything, as in torch.
    assert all(found == {torch.float32} for found in _dtypes(model.to_inference_dtype(torch.float32)).values())
    assert all(found == {dtype} for found in _dtypes(PASamModel.from_pretrained(saved).to(dtype)).values())


def test_pipeline_on_a_half_precision_model(saved, image):
    generator = pipeline("mask-generation", model=str(saved), device="cpu", dtype=torch.bfloat16)
    assert generator.model.vision_encoder.patch_embed.projection.weight.dtype == torch.bfloat16
    assert generator.model.mask_decoder.iou_token.weight.dtype == torch.float32
    result = generator(Image.fromarray(image), points_per_batch=16, points_per_crop=4, pred_iou_thresh=0.0,
                       stability_score_thresh=0.0)
    assert result["masks"] and all(mask.shape == image.shape[:2] for mask in result["masks"])


@pytest.mark.parametrize("with_adapter", [False, True])
def test_from_sam_pretrained_in_bf16_keeps_the_whole_decoder_with_its_adapter_in_fp32(
    tmp_path, model, processor, image, with_adapter
):
    from transformers import SamConfig, SamModel

    from pasam_hf.adapters import save_adapter

    sam_config = SamConfig(**{name: getattr(model.config, name).to_dict() for name in (
        "vision_config", "prompt_encoder_config", "mask_decoder_config")})
    sam = SamModel(sam_config)
    sam.load_state_dict({k: v for k, v in model.state_dict().items() if k in sam.state_dict()})
    sam.save_pretrained(tmp_path / "sam")
    adapter = str(save_adapter(model, tmp_path / "adapter")) if with_adapter else None
    loaded = PASamModel.from_sam_pretrained(str(tmp_path / "sam"), adapter=adapter, dtype=torch.bfloat16).eval()
    dtypes = _dtypes(loaded)
    assert dtypes.pop("vision_encoder") == {torch.bfloat16}
    assert all(found == {torch.float32} for found in dtypes.values()), dtypes
    inputs = _inputs(processor, image)
    with torch.inference_mode():
        outputs = loaded(**inputs)
    assert outputs.pred_masks.dtype == torch.float32
    if with_adapter:  # the released/fine-tuned adapter arrives in fp32 exactly, not rounded through bf16
        state = model.mask_decoder.state_dict()
        assert all(torch.equal(v, state[k]) for k, v in loaded.mask_decoder.state_dict().items())
