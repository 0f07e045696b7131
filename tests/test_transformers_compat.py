"""Behaviours transformers users rely on that transformers' common tests exposed as missing (issue 16): compiling
and exporting, SamProcessor's call signature, dtype handling when built from a config, the kwargs annotation."""

from __future__ import annotations

import inspect

import numpy as np
import pytest
import torch
from conftest import synthetic_image
from transformers import AutoModel

from pasam_hf import PASamConfig, PASamModel, PASamProcessor


@pytest.fixture
def inputs(processor: PASamProcessor) -> dict:
    return dict(processor(images=synthetic_image(), input_points=[[[60, 50]]], return_tensors="pt"))


def _compile_and_compare(model: PASamModel, inputs: dict, backend: str) -> None:
    """D3: compiled without adapter_pixel_values, the edge map (NumPy/OpenCV) runs outside the graph, at one graph
    break, and the outputs are eager's; with adapter_pixel_values given there is no graph break (fullgraph)."""
    pixel_values, input_points = inputs["pixel_values"], inputs["input_points"]
    with torch.no_grad():
        eager = model(pixel_values=pixel_values, input_points=input_points)
        torch._dynamo.reset()
        explained = torch._dynamo.explain(model)(pixel_values=pixel_values, input_points=input_points)
        assert len(explained.break_reasons) == 1
        assert "canny_edge_map" in str(explained.break_reasons[0].user_stack[-1]) or "compute_adapter_pixel_values" in str(
            explained.break_reasons[0].user_stack[-1]
        )
        torch._dynamo.reset()
        compiled = torch.compile(model, backend=backend)(pixel_values=pixel_values, input_points=input_points)
        torch.testing.assert_close(compiled.pred_masks, eager.pred_masks, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(compiled.iou_scores, eager.iou_scores, atol=1e-4, rtol=1e-4)
        torch._dynamo.reset()
        full = torch.compile(model, backend=backend, fullgraph=True)(**inputs)
        torch.testing.assert_close(full.pred_masks, eager.pred_masks, atol=1e-4, rtol=1e-4)
    torch._dynamo.reset()


def test_compile_aot_eager_with_and_without_adapter_pixel_values(model: PASamModel, inputs: dict) -> None:
    _compile_and_compare(model, inputs, "aot_eager")


@pytest.mark.heavy
def test_compile_inductor_with_and_without_adapter_pixel_values(model: PASamModel, inputs: dict) -> None:
    _compile_and_compare(model, inputs, "inductor")


def test_torch_export_with_adapter_pixel_values(model: PASamModel, inputs: dict) -> None:
    """D3: torch.export works when adapter_pixel_values are given; without them the host-side edge map cannot be
    exported (torch.export allows no graph break) and the error says what to pass (it was "RuntimeError: .numpy()
    is not supported for tensor subclasses")."""
    keys = ("pixel_values", "input_points", "adapter_pixel_values")
    exported = torch.export.export(model, args=(), kwargs={key: inputs[key] for key in keys})
    with torch.no_grad():
        eager = model(**{key: inputs[key] for key in keys})
        out = exported.module()(**{key: inputs[key] for key in keys})
    torch.testing.assert_close(out["pred_masks"], eager.pred_masks, atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="pass adapter_pixel_values"):
        torch.export.export(model, args=(), kwargs={key: inputs[key] for key in keys[:2]})


def test_processor_accepts_text_as_sam_processor_does(processor: PASamProcessor) -> None:
    """D4: SamProcessor takes `text` (and ignores it); PASamProcessor's signature lists it and used to raise."""
    assert "text" in inspect.signature(PASamProcessor.__call__).parameters
    with_text = processor(images=synthetic_image(), text="a cat", input_points=[[[60, 50]]], return_tensors="pt")
    without = processor(images=synthetic_image(), input_points=[[[60, 50]]], return_tensors="pt")
    assert set(with_text) == set(without)
    for key in without:
        assert torch.equal(with_text[key], without[key]), key


@pytest.mark.parametrize("build", ["AutoModel.from_config", "_from_config"])
def test_decoder_in_fp32_holds_when_built_from_a_config(build: str, inputs: dict) -> None:
    """D6: as from_pretrained(dtype=bf16) does, the prompt side stays float32 and only the image encoder is bf16."""
    config = PASamConfig.small()
    if build == "AutoModel.from_config":
        model = AutoModel.from_config(config, dtype=torch.bfloat16)
    else:
        model = PASamModel._from_config(config, dtype=torch.bfloat16)
    assert torch.get_default_dtype() == torch.float32
    for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
        if not tensor.is_floating_point():
            continue
        expected = torch.bfloat16 if name.startswith("vision_encoder.") else torch.float32
        assert tensor.dtype == expected, name
    with torch.no_grad():
        outputs = model.eval()(**inputs)
    assert outputs.pred_masks.dtype == torch.float32 and torch.isfinite(outputs.pred_masks).all()
    config.decoder_in_fp32 = False
    everything_low = PASamModel._from_config(config, dtype=torch.bfloat16)
    assert {p.dtype for p in everything_low.parameters()} == {torch.bfloat16}


def test_forward_kwargs_annotation_is_transformers_kwargs() -> None:
    """transformers reads `**kwargs: Unpack[TransformersKwargs]` to know the model takes output_attentions;
    `from __future__ import annotations` turned it into a string it cannot read."""
    annotation = inspect.signature(PASamModel.forward).parameters["kwargs"].annotation
    assert not isinstance(annotation, str)
    assert "output_attentions" in annotation.__args__[0].__annotations__


def test_four_channel_array_without_rgb_conversion_names_the_cause(processor: PASamProcessor) -> None:
    """Smaller defect of issue 16: was "mean must have 3 elements if it is an iterable, got 4"."""
    rgba = np.dstack([synthetic_image(), np.full((96, 128), 255, np.uint8)])
    with pytest.raises(ValueError, match=r"images\[0\] has 4 channels .*do_convert_rgb"):
        processor(images=rgba, do_convert_rgb=False, image_mean=[0.5] * 4, image_std=[0.5] * 4, return_tensors="pt")
    # The default converts RGBA to RGB (alpha onto white), as before.
    assert processor(images=rgba, return_tensors="pt")["pixel_values"].shape[1] == 3
