"""Auto classes, save/load round trip, remote code, SAM checkpoints, processors and the mask-generation pipeline."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import synthetic_image
from PIL import Image
from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModel,
    AutoModelForMaskGeneration,
    AutoProcessor,
    SamConfig,
    SamModel,
    pipeline,
)

from pasam_hf import (
    PASamConfig,
    PASamImageProcessor,
    PASamImageProcessorPil,
    PASamModel,
    PASamProcessor,
)


@pytest.fixture
def saved(tmp_path: Path, model: PASamModel, processor: PASamProcessor) -> Path:
    directory = tmp_path / "pa-sam-tiny"
    model.save_pretrained(directory)
    processor.save_pretrained(directory)
    return directory


def _inputs(processor: PASamProcessor, image: np.ndarray) -> dict:
    return processor(images=Image.fromarray(image), input_boxes=[[[20.0, 10.0, 100.0, 80.0]]], return_tensors="pt")


def _run(model: PASamModel, inputs: dict) -> torch.Tensor:
    keys = ("pixel_values", "input_boxes", "adapter_pixel_values")
    with torch.no_grad():
        return model(**{k: inputs[k] for k in keys}).pred_masks


def test_round_trip_safetensors_identical_outputs(saved: Path, model: PASamModel, processor, image) -> None:
    assert (saved / "model.safetensors").is_file()
    assert not list(saved.glob("*.bin"))
    config = json.loads((saved / "config.json").read_text())
    assert config["model_type"] == "pa_sam"
    assert config["auto_map"]["AutoModelForMaskGeneration"] == "modeling_pasam.PASamModel"
    reloaded = PASamModel.from_pretrained(saved).eval()
    inputs = _inputs(PASamProcessor.from_pretrained(saved), image)
    assert torch.equal(_run(model, inputs), _run(reloaded, inputs))
    assert reloaded.config.mask_decoder_config.edge_mode == model.config.mask_decoder_config.edge_mode


def test_auto_classes(saved: Path, model: PASamModel, image) -> None:
    assert isinstance(AutoConfig.from_pretrained(saved), PASamConfig)
    assert isinstance(AutoConfig.for_model("pa_sam"), PASamConfig)
    for auto in (AutoModel, AutoModelForMaskGeneration):
        loaded = auto.from_pretrained(saved)
        assert isinstance(loaded, PASamModel)
    assert isinstance(AutoModel.from_config(PASamConfig.small()), PASamModel)
    image_processor = AutoImageProcessor.from_pretrained(saved)
    assert isinstance(image_processor, (PASamImageProcessor, PASamImageProcessorPil))
    assert isinstance(AutoImageProcessor.from_pretrained(saved, backend="pil"), PASamImageProcessorPil)
    processor = AutoProcessor.from_pretrained(saved)
    assert isinstance(processor, PASamProcessor)
    inputs = _inputs(processor, image)
    assert inputs["adapter_pixel_values"].shape == (1, 4, 32, 32)
    assert set(inputs) >= {"pixel_values", "adapter_pixel_values", "original_sizes", "reshaped_input_sizes"}
    masks = processor.post_process_masks(
        _run(AutoModel.from_pretrained(saved).eval(), inputs), inputs["original_sizes"], inputs["reshaped_input_sizes"]
    )
    assert masks[0].shape == (1, 1, image.shape[0], image.shape[1])


def test_processor_backends_agree_and_edge_modes(image) -> None:
    config = PASamConfig()
    fast = PASamProcessor.from_model_config(config)
    pil = PASamProcessor(image_processor=PASamImageProcessorPil(**fast.image_processor.to_dict()))
    a = fast(images=Image.fromarray(image), input_points=[[[[40, 40]]]], return_tensors="pt")
    b = pil(images=Image.fromarray(image), input_points=[[[[40, 40]]]], return_tensors="pt")
    torch.testing.assert_close(a["pixel_values"], b["pixel_values"], atol=1e-5, rtol=0)
    torch.testing.assert_close(a["input_points"], b["input_points"])
    # the edge maps are binary and agree except where float noise moves a value across a Canny threshold
    assert (a["adapter_pixel_values"][:, 3] != b["adapter_pixel_values"][:, 3]).float().mean() < 1e-3
    rgb = PASamProcessor.from_model_config(PASamConfig(mask_decoder_config={"edge_mode": "rgb"}))
    edges_rgb = rgb(images=Image.fromarray(image), return_tensors="pt")["adapter_pixel_values"][:, 3]
    assert set(edges_rgb.unique().tolist()) <= {0.0, 1.0}
    assert not torch.equal(edges_rgb, a["adapter_pixel_values"][:, 3])


def test_processor_output_equals_model_fallback(model: PASamModel, processor: PASamProcessor, image) -> None:
    inputs = _inputs(processor, image)
    torch.testing.assert_close(
        model.compute_adapter_pixel_values(inputs["pixel_values"]), inputs["adapter_pixel_values"]
    )
    with torch.no_grad():
        without = model(pixel_values=inputs["pixel_values"], input_boxes=inputs["input_boxes"]).pred_masks
    torch.testing.assert_close(without, _run(model, inputs))


def test_from_sam_pretrained_loads_sam_with_only_adapter_keys_missing(tmp_path: Path, image) -> None:
    torch.manual_seed(0)
    sam_config = SamConfig(**{k: v.to_dict() for k, v in {
        "vision_config": PASamConfig.small().vision_config,
        "prompt_encoder_config": PASamConfig.small().prompt_encoder_config,
    }.items()}, mask_decoder_config=dict(hidden_size=32, mlp_dim=64, num_attention_heads=2, iou_head_hidden_dim=32))
    sam = SamModel(sam_config).eval()
    sam.save_pretrained(tmp_path / "sam")
    model = PASamModel.from_sam_pretrained(tmp_path / "sam")
    model.eval()
    sam_state = sam.state_dict()
    for name, tensor in model.state_dict().items():
        if name in sam_state:
            assert torch.equal(tensor, sam_state[name]), name
    assert set(model.state_dict()) - set(sam_state) == set(model.adapter_state_dict_keys())
    # The SAM config says transformers' layer-norm eps (1e-6); PA-SAM runs SAM's weights with the 1e-5 of the code
    # they were trained with (reference section 10). Compare with a SamModel built with that same eps.
    assert model.config.mask_decoder_config.layer_norm_eps == 1e-5
    same_eps = sam_config.to_dict()
    same_eps["mask_decoder_config"]["layer_norm_eps"] = model.config.mask_decoder_config.layer_norm_eps
    sam_same_eps = SamModel(SamConfig(**same_eps)).eval()
    sam_same_eps.load_state_dict(sam.state_dict())
    processor = PASamProcessor.from_model_config(model.config)
    inputs = _inputs(processor, image)
    with torch.no_grad():
        ours = model(**{k: inputs[k] for k in ("pixel_values", "input_boxes", "adapter_pixel_values")},
                     mine_points=False).pred_masks
        theirs = sam_same_eps(pixel_values=inputs["pixel_values"], input_boxes=inputs["input_boxes"],
                              multimask_output=False).pred_masks
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


def test_from_sam_pretrained_rejects_other_architectures(saved: Path, tmp_path: Path) -> None:
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "config.json").write_text(json.dumps({"model_type": "vit"}))
    with pytest.raises(ValueError, match="not SAM"):
        PASamModel.from_sam_pretrained(tmp_path / "other")


def test_pipeline_uses_the_adapter(saved: Path, image) -> None:
    seen: list[tuple] = []
    generator = pipeline("mask-generation", model=str(saved), device="cpu")
    assert isinstance(generator.model, PASamModel)
    adapter = generator.model.mask_decoder.prompt_adapter
    handle = adapter.register_forward_hook(lambda module, args, kwargs, out: seen.append(out), with_kwargs=True)
    original_forward = generator.model.forward
    received: list[set] = []

    def spy(*args, **kwargs):
        received.append(set(kwargs))
        return original_forward(*args, **kwargs)

    generator.model.forward = spy
    try:
        result = generator(Image.fromarray(image), points_per_batch=16, points_per_crop=4, pred_iou_thresh=0.0,
                           stability_score_thresh=0.0)
    finally:
        handle.remove()
    assert received and all("adapter_pixel_values" in keys and "image_embeddings" in keys for keys in received)
    assert seen and seen[0].mined_indices is not None
    assert "masks" in result and "scores" in result
    assert all(mask.shape == image.shape[:2] for mask in result["masks"])


def test_remote_code_loads_without_the_package(saved: Path, model: PASamModel, processor, image, tmp_path) -> None:
    for module in ("configuration_pasam.py", "modeling_pasam.py", "image_processing_pasam.py", "losses.py"):
        assert (saved / module).is_file(), module
    inputs = _inputs(processor, image)
    expected = _run(model, inputs)
    torch.save({k: inputs[k] for k in ("pixel_values", "input_boxes", "adapter_pixel_values")}, tmp_path / "in.pt")
    script = f"""
import sys
sys.modules["pasam_hf"] = None  # the package is not importable: everything must come from the checkpoint
import torch
torch.set_num_threads({torch.get_num_threads()})  # the same float sums as this process, for bit-equal masks
from transformers import AutoModelForMaskGeneration, AutoProcessor
model = AutoModelForMaskGeneration.from_pretrained({str(saved)!r}, trust_remote_code=True).eval()
processor = AutoProcessor.from_pretrained({str(saved)!r}, trust_remote_code=True)
assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
assert type(processor).__name__ == "PASamProcessor", type(processor)
inputs = torch.load({str(tmp_path / 'in.pt')!r})
with torch.no_grad():
    torch.save(model(**inputs).pred_masks, {str(tmp_path / 'out.pt')!r})
"""
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "modules"))
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert torch.equal(torch.load(tmp_path / "out.pt"), expected)


def test_remote_code_loads_processors_saved_with_either_backend(model: PASamModel, image, tmp_path: Path) -> None:
    """A checkpoint whose processor was saved with the PIL backend loads by remote code too (transformers writes
    both backends' configs alike, so the auto_map must name both), as does an image processor saved alone."""
    torchvision = PASamProcessor.from_model_config(model.config)
    pil = PASamProcessor(image_processor=PASamImageProcessorPil(**torchvision.image_processor.to_dict()))
    expected = {}
    for name, processor in (("torchvision", torchvision), ("pil", pil)):
        model.save_pretrained(tmp_path / name)
        processor.save_pretrained(tmp_path / name)
        processor.image_processor.save_pretrained(tmp_path / f"{name}-image-processor")
        expected[name] = processor(images=image, return_tensors="pt")["adapter_pixel_values"]
    saved = json.loads((tmp_path / "pil" / "processor_config.json").read_text())["image_processor"]
    assert saved["auto_map"]["AutoImageProcessor"] == {
        "torchvision": "image_processing_pasam.PASamImageProcessor",
        "pil": "image_processing_pasam.PASamImageProcessorPil",
    }
    np.save(tmp_path / "image.npy", image)
    script = f"""
import sys
sys.modules["pasam_hf"] = None  # the package is not importable: everything must come from the checkpoint
import numpy as np, torch
from transformers import AutoImageProcessor, AutoProcessor
root, image, results = {str(tmp_path)!r}, np.load({str(tmp_path / 'image.npy')!r}), {{}}
for saved_with in ("torchvision", "pil"):
    for backend in ("torchvision", "pil"):
        processor = AutoProcessor.from_pretrained(f"{{root}}/{{saved_with}}", trust_remote_code=True, backend=backend)
        image_processor = AutoImageProcessor.from_pretrained(
            f"{{root}}/{{saved_with}}-image-processor", trust_remote_code=True, backend=backend
        )
        for loaded in (processor.image_processor, image_processor):
            name = type(loaded).__name__
            assert name == "PASamImageProcessor" + ("Pil" if backend == "pil" else ""), (saved_with, backend, name)
            assert type(loaded).__module__.startswith("transformers_modules"), type(loaded).__module__
        results[saved_with, backend] = processor(images=image, return_tensors="pt")["adapter_pixel_values"]
torch.save(results, f"{{root}}/out.pt")
"""
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "modules"))
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    for (saved_with, backend), adapter_pixel_values in torch.load(tmp_path / "out.pt").items():
        torch.testing.assert_close(adapter_pixel_values, expected[backend])


def test_from_sam_pretrained_reports_no_adapter_tensor_as_missing(tmp_path: Path, caplog) -> None:
    """transformers' load report listed all adapter tensors as MISSING / newly initialized, also with `adapter=`,
    which then loads them; the one line from_sam_pretrained writes itself is what a user needs."""
    import logging

    from pasam_hf.adapters import save_adapter

    torch.manual_seed(0)
    sam_config = SamConfig(**{k: v.to_dict() for k, v in {
        "vision_config": PASamConfig.small().vision_config,
        "prompt_encoder_config": PASamConfig.small().prompt_encoder_config,
    }.items()}, mask_decoder_config={"hidden_size": 32, "mlp_dim": 64, "num_attention_heads": 2, "iou_head_hidden_dim": 32})
    SamModel(sam_config).save_pretrained(tmp_path / "sam")
    # transformers' loggers do not propagate to the root logger that caplog listens to: listen to them directly.
    reported: list[str] = []
    listener = logging.Handler()
    listener.emit = lambda record: reported.append(record.getMessage())
    logging.getLogger("transformers").addHandler(listener)
    try:
        fresh = PASamModel.from_sam_pretrained(tmp_path / "sam", adapter_init="random")
        said = "\n".join(reported) + caplog.text
        assert "MISSING" not in said and "newly initialized" not in said, said
        assert "PA-SAM adapter tensors" in said and "are new and initialised" in said
        save_adapter(fresh, tmp_path / "adapter")
        reported.clear()
        caplog.clear()
        loaded = PASamModel.from_sam_pretrained(tmp_path / "sam", adapter=str(tmp_path / "adapter"))
        said = "\n".join(reported) + caplog.text
        assert "MISSING" not in said and "are new and initialised" not in said, said
    finally:
        logging.getLogger("transformers").removeHandler(listener)
    for name in fresh.adapter_state_dict_keys():
        assert torch.equal(loaded.state_dict()[name], fresh.state_dict()[name]), name
