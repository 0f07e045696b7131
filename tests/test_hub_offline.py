"""Loading by Hub repo id, offline: every entry point a user names a model with, resolved from a local Hugging Face
cache in the real hub layout (tests/hub_cache.py) with `HF_HUB_OFFLINE=1`.

In this process the cache is pointed at by `huggingface_hub.constants.HF_HUB_CACHE` (what the `HF_HUB_CACHE`
environment variable sets when huggingface_hub is imported); the CLI and remote-code tests run a fresh Python with
the environment variables themselves, as a user would.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from conftest import synthetic_image, tiny_config
from hub_cache import add_to_hub_cache
from huggingface_hub import constants
from transformers import (
    AutoImageProcessor,
    AutoModel,
    AutoModelForMaskGeneration,
    AutoProcessor,
    SamConfig,
    SamModel,
    pipeline,
)
from transformers.models.sam.configuration_sam import SamMaskDecoderConfig

from pasam_hf import PASamImageProcessor, PASamModel, PASamProcessor
from pasam_hf.adapters import AdapterError, load_adapter, save_adapter, trainable_parameter_names
from pasam_hf.loading import ModelLoadError, load_model_and_processor

PASAM_ID = "pasam-org/pa-sam-tiny"
SAM_ID = "sam-org/sam-tiny"
ADAPTER_ID = "pasam-org/pa-sam-tiny-adapter"
BOX = [20.0, 10.0, 100.0, 80.0]


def tiny_sam_config() -> SamConfig:
    """transformers' SamConfig with the trunk sizes of `tiny_config()`."""
    small = tiny_config()
    decoder_fields = SamMaskDecoderConfig.__dataclass_fields__
    return SamConfig(
        vision_config=small.vision_config.to_dict(),
        prompt_encoder_config=small.prompt_encoder_config.to_dict(),
        mask_decoder_config={k: v for k, v in small.mask_decoder_config.to_dict().items() if k in decoder_fields},
    )


@pytest.fixture(scope="module")
def hub(tmp_path_factory) -> dict:
    """A Hub cache holding a PA-SAM model, a SAM model (as SAM checkpoints are served: config of model_type `sam`,
    model.safetensors, SamImageProcessor's preprocessor_config.json) and a PA-SAM adapter, with this process
    pointed at it, offline. Yields the models the repos were made from."""
    root = tmp_path_factory.mktemp("hub")
    cache = root / "hf-home" / "hub"  # where huggingface_hub puts it for HF_HOME=<root>/hf-home
    config = tiny_config()
    torch.manual_seed(0)
    pasam = PASamModel(config).eval()
    # As `pasam train --push-to-hub` uploads it: the model, its processor, and its adapter alone in adapter/.
    pasam.save_pretrained(root / "pasam")
    PASamProcessor.from_model_config(config).save_pretrained(root / "pasam")
    save_adapter(pasam, root / "pasam" / "adapter")
    add_to_hub_cache(cache, PASAM_ID, root / "pasam")

    sam_config = tiny_sam_config()
    torch.manual_seed(1)
    sam = SamModel(sam_config).eval()
    sam.save_pretrained(root / "sam")
    # The preprocessor_config.json of facebook/sam-vit-base (written by transformers 4), at this model's size.
    size = sam_config.vision_config.image_size
    (root / "sam" / "preprocessor_config.json").write_text(json.dumps({
        "do_normalize": True, "do_pad": True, "do_rescale": True, "do_resize": True,
        "image_mean": [0.485, 0.456, 0.406], "image_processor_type": "SamImageProcessor",
        "image_std": [0.229, 0.224, 0.225], "pad_size": {"height": size, "width": size},
        "processor_class": "SamProcessor", "resample": 2, "rescale_factor": 0.00392156862745098,
        "size": {"longest_edge": size},
    }, indent=2))
    add_to_hub_cache(cache, SAM_ID, root / "sam")

    # An adapter trained on that SAM: SAM's weights, with the PA-SAM trained parts changed.
    trained = PASamModel.from_sam_pretrained(str(root / "sam"), adapter_init="random").eval()
    trainable = set(trainable_parameter_names(trained))
    with torch.no_grad():
        for name, parameter in trained.named_parameters():
            if name in trainable:
                parameter.add_(0.01 * torch.randn_like(parameter))
    save_adapter(trained, root / "adapter", base_model=SAM_ID)
    add_to_hub_cache(cache, ADAPTER_ID, root / "adapter")

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(constants, "HF_HUB_CACHE", str(cache))
        patch.setattr(constants, "HF_HUB_OFFLINE", True)
        patch.setenv("HF_HUB_OFFLINE", "1")
        yield {"cache": cache, "root": root, "pasam": pasam, "sam": sam, "trained": trained}


def pasam_inputs(processor) -> dict:
    inputs = processor(images=PIL.Image.fromarray(synthetic_image()), input_boxes=[[BOX]], return_tensors="pt")
    return {k: inputs[k] for k in ("pixel_values", "input_boxes", "adapter_pixel_values")}


def pred_masks(model, inputs: dict) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs, multimask_output=False).pred_masks


def assert_same_weights(loaded: torch.nn.Module, expected: torch.nn.Module) -> None:
    theirs = expected.state_dict()
    ours = {name: tensor for name, tensor in loaded.state_dict().items() if name in theirs}
    assert ours.keys() == theirs.keys()
    for name, tensor in ours.items():
        assert torch.equal(tensor, theirs[name]), name


def test_cache_is_the_hub_layout(hub) -> None:
    repo = hub["cache"] / "models--pasam-org--pa-sam-tiny"
    commit = (repo / "refs" / "main").read_text()
    weights = repo / "snapshots" / commit / "model.safetensors"
    assert weights.is_symlink() and weights.resolve().parent == (repo / "blobs").resolve()
    assert len(weights.resolve().name) == 64  # LFS files are stored under their sha256
    config = repo / "snapshots" / commit / "config.json"
    assert config.is_symlink() and len(config.resolve().name) == 40  # other files under their git blob sha1


def test_model_by_repo_id(hub) -> None:
    model = PASamModel.from_pretrained(PASAM_ID).eval()
    assert_same_weights(model, hub["pasam"])
    assert model.config.name_or_path == PASAM_ID
    for auto_class in (AutoModelForMaskGeneration, AutoModel):
        loaded = auto_class.from_pretrained(PASAM_ID)
        assert type(loaded) is PASamModel
        assert_same_weights(loaded, hub["pasam"])


def test_processor_by_repo_id(hub) -> None:
    processor = PASamProcessor.from_pretrained(PASAM_ID)
    auto = AutoProcessor.from_pretrained(PASAM_ID)
    assert type(auto) is PASamProcessor
    assert type(AutoImageProcessor.from_pretrained(PASAM_ID)) is PASamImageProcessor
    expected = pasam_inputs(PASamProcessor.from_model_config(hub["pasam"].config))
    for loaded in (processor, auto):
        for key, value in pasam_inputs(loaded).items():
            assert torch.equal(value, expected[key]), key


def test_pipeline_by_repo_id(hub) -> None:
    generator = pipeline("mask-generation", model=PASAM_ID, device="cpu")
    assert isinstance(generator.model, PASamModel) and isinstance(generator.image_processor, PASamImageProcessor)
    assert_same_weights(generator.model, hub["pasam"])
    result = generator(PIL.Image.fromarray(synthetic_image()), points_per_batch=16, points_per_crop=4,
                       pred_iou_thresh=0.0, stability_score_thresh=0.0)
    assert result["masks"] and all(mask.shape == (96, 128) for mask in result["masks"])


def test_sam_repo_id_becomes_pasam(hub) -> None:
    model = PASamModel.from_sam_pretrained(SAM_ID).eval()
    assert_same_weights(model, hub["sam"])
    assert model.config.model_type == "pa_sam"


def test_adapter_by_repo_id(hub) -> None:
    composed = PASamModel.from_sam_pretrained(SAM_ID, adapter=ADAPTER_ID).eval()
    assert_same_weights(composed, hub["trained"])
    torch.manual_seed(3)
    other = PASamModel.from_sam_pretrained(SAM_ID, adapter_init="random").eval()
    assert_same_weights(load_adapter(other, ADAPTER_ID), hub["trained"])


def test_adapter_of_a_trained_model_by_repo_id(hub) -> None:
    """The adapter `pasam train` saves in `adapter/` next to the model composes with SAM from the model's repo id
    (or its output directory)."""
    pasam, sam = hub["pasam"].state_dict(), hub["sam"].state_dict()
    trained = set(trainable_parameter_names(hub["pasam"]))
    for adapter in (PASAM_ID, str(hub["root"] / "pasam")):
        composed = PASamModel.from_sam_pretrained(SAM_ID, adapter=adapter).state_dict()
        assert all(torch.equal(composed[name], pasam[name]) for name in trained)
        assert all(torch.equal(composed[name], sam[name]) for name in sam if name not in trained)


def test_load_model_and_processor_by_repo_id(hub) -> None:
    """The loader of the CLIs and the demo, on a PA-SAM and on a SAM repo id."""
    model, processor = load_model_and_processor(PASAM_ID)
    assert_same_weights(model, hub["pasam"])
    expected = pred_masks(hub["pasam"], pasam_inputs(PASamProcessor.from_model_config(hub["pasam"].config)))
    assert torch.equal(pred_masks(model, pasam_inputs(processor)), expected)
    model, processor = load_model_and_processor(SAM_ID)
    assert_same_weights(model, hub["sam"])
    inputs = processor(images=PIL.Image.fromarray(synthetic_image()), input_boxes=[[BOX]], return_tensors="pt")
    assert "adapter_pixel_values" in inputs  # SAM's processor config gives PA-SAM's processor
    keys = ("pixel_values", "input_boxes", "adapter_pixel_values")
    reference = PASamModel.from_sam_pretrained(str(hub["root"] / "sam")).eval()
    expected = pred_masks(reference, pasam_inputs(PASamProcessor.from_model_config(reference.config)))
    assert torch.equal(pred_masks(model, {k: inputs[k] for k in keys if k in inputs}), expected)


def test_repo_id_missing_from_the_cache_is_one_clear_error(hub) -> None:
    with pytest.raises(ModelLoadError, match="not in the local cache"):
        load_model_and_processor("pasam-org/not-downloaded")
    for missing in ("pasam-org/not-downloaded", SAM_ID):  # a repo not cached, a repo without an adapter
        with pytest.raises(AdapterError, match=f"could not get adapter '{missing}' from the Hugging Face Hub"):
            PASamModel.from_sam_pretrained(SAM_ID, adapter=missing)


def test_cli_by_repo_id(hub, tmp_path: Path) -> None:
    """`pasam segment --model org/name` and `pasam train --model <SAM repo id>` (the README recipe), each a fresh
    process that finds the cache through HF_HOME (the other test with a subprocess uses HF_HUB_CACHE)."""
    PIL.Image.fromarray(synthetic_image()).save(tmp_path / "a.png")
    for folder in ("images", "masks"):
        (tmp_path / "data" / folder).mkdir(parents=True)
    for index in range(2):
        image = synthetic_image(seed=index)
        PIL.Image.fromarray(image).save(tmp_path / "data" / "images" / f"{index}.png")
        PIL.Image.fromarray(np.where(image[..., 0] > 200, 255, 0).astype(np.uint8)).save(
            tmp_path / "data" / "masks" / f"{index}.png"
        )
    env = {key: value for key, value in os.environ.items() if key not in ("HF_HUB_CACHE", "HF_HOME")}
    env.update(HF_HOME=str(hub["cache"].parent), HF_HUB_OFFLINE="1")
    commands = {
        "segment": ["segment", "a.png", "--box", *map(str, BOX), "--model", PASAM_ID, "--device", "cpu",
                    "--out", "out"],
        "train": ["train", "--model", SAM_ID, "--data", "data", "--output-dir", "run", "--max-steps", "1",
                  "--batch-size", "2", "--report-to", "none", "--no-progress", "--max-instances-per-image", "1"],
    }
    # Side by side: each process mostly waits on its imports.
    processes = {
        name: subprocess.Popen([sys.executable, "-m", "pasam_hf", *args], cwd=tmp_path, env=env, text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        for name, args in commands.items()
    }
    results = {name: (process.wait(timeout=300), *process.communicate()) for name, process in processes.items()}
    for name, (code, out, err) in results.items():
        assert code == 0, (name, out[-2000:], err[-3000:])

    mask = np.asarray(PIL.Image.open(tmp_path / "out" / "a_mask.png"))
    processor = PASamProcessor.from_model_config(hub["pasam"].config)
    inputs = processor(images=synthetic_image(), input_boxes=[[BOX]], return_tensors="pt")
    logits = processor.post_process_masks(
        list(pred_masks(hub["pasam"], pasam_inputs(processor))), inputs["original_sizes"],
        inputs["reshaped_input_sizes"], binarize=False,
    )[0][0, 0].numpy()
    decided = np.abs(logits) > 1e-4  # pixels this close to 0 may flip between processes
    assert np.array_equal((mask == 255)[decided], (logits > 0)[decided])

    # The README's recipe: a SAM repo (with SAM's own processor config) gets a fresh adapter and trains it.
    trained = PASamModel.from_pretrained(tmp_path / "run")
    trainable = set(trainable_parameter_names(trained))
    start = PASamModel.from_sam_pretrained(str(hub["root"] / "sam")).state_dict()
    end = trained.state_dict()
    assert all(torch.equal(end[name], start[name]) for name in start if name not in trainable)
    assert any(not torch.equal(end[name], start[name]) for name in trainable)


def test_remote_code_by_repo_id_without_the_package(hub, tmp_path: Path) -> None:
    """`trust_remote_code=True` by repo id where pasam_hf cannot be imported: the code comes from the repo."""
    inputs = pasam_inputs(PASamProcessor.from_model_config(hub["pasam"].config))
    expected = pred_masks(hub["pasam"], inputs)
    torch.save(inputs, tmp_path / "in.pt")
    script = f"""
import sys
sys.modules["pasam_hf"] = None  # not importable: everything must come from the cached repo
import torch
torch.set_num_threads({torch.get_num_threads()})
from transformers import AutoModelForMaskGeneration, AutoProcessor, pipeline
model = AutoModelForMaskGeneration.from_pretrained({PASAM_ID!r}, trust_remote_code=True).eval()
processor = AutoProcessor.from_pretrained({PASAM_ID!r}, trust_remote_code=True)
assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
assert type(processor).__name__ == "PASamProcessor", type(processor)
inputs = torch.load({str(tmp_path / 'in.pt')!r})
with torch.no_grad():
    torch.save(model(**inputs, multimask_output=False).pred_masks, {str(tmp_path / 'out.pt')!r})
generator = pipeline("mask-generation", model={PASAM_ID!r}, trust_remote_code=True, device="cpu")
assert type(generator.model).__name__ == "PASamModel", type(generator.model)
"""
    env = dict(os.environ, HF_HUB_CACHE=str(hub["cache"]), HF_HUB_OFFLINE="1",
               HF_MODULES_CACHE=str(tmp_path / "modules"))
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert torch.equal(torch.load(tmp_path / "out.pt"), expected)
    assert json.loads((hub["root"] / "pasam" / "config.json").read_text())["auto_map"]


def test_explicit_cache_dir_reaches_every_file(hub, tmp_path: Path, monkeypatch) -> None:
    """`cache_dir=` (a cache other than the default one) is where the SAM weights, the PA-SAM checkpoint, its
    processor and an adapter by repo id are all read from."""
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-default-cache"))
    cache_dir = str(hub["cache"])
    assert_same_weights(PASamModel.from_pretrained(PASAM_ID, cache_dir=cache_dir), hub["pasam"])
    assert type(PASamProcessor.from_pretrained(PASAM_ID, cache_dir=cache_dir)) is PASamProcessor
    composed = PASamModel.from_sam_pretrained(SAM_ID, adapter=ADAPTER_ID, cache_dir=cache_dir)
    assert_same_weights(composed, hub["trained"])
    other = PASamModel.from_sam_pretrained(SAM_ID, cache_dir=cache_dir)
    assert_same_weights(load_adapter(other, ADAPTER_ID, cache_dir=cache_dir), hub["trained"])


def test_revision_picks_the_commit(hub, tmp_path: Path) -> None:
    """A second commit of the repo under the tag `v2`: `revision="v2"` loads it, the default stays on main."""
    torch.manual_seed(2)
    newer = PASamModel(tiny_config()).eval()
    newer.save_pretrained(tmp_path / "v2")
    PASamProcessor.from_model_config(newer.config).save_pretrained(tmp_path / "v2")
    add_to_hub_cache(hub["cache"], PASAM_ID, tmp_path / "v2", revision="v2")
    assert_same_weights(PASamModel.from_pretrained(PASAM_ID, revision="v2"), newer)
    assert_same_weights(load_model_and_processor(PASAM_ID, revision="v2")[0], newer)
    assert_same_weights(PASamModel.from_pretrained(PASAM_ID), hub["pasam"])
