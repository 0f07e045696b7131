"""Reliability of loading: project artifacts are safetensors only, pickle files never run code, and a broken
checkpoint (truncated weights, config.json with unknown or missing fields, another architecture, missing or
mis-shaped weights) gives one ModelLoadError naming the file and the fix."""

from __future__ import annotations

import json
import pathlib
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModel, SamConfig, SamModel, ViTConfig, ViTModel

from pasam_hf import PASamConfig, PASamModel
from pasam_hf.loading import ModelLoadError, check_config_dict, load_model_and_processor, load_pth_state_dict

MARKER_NAME = "pickle-ran-code"


class RunsCodeWhenUnpickled:
    """A pickle payload that would create a marker file if unpickling executed it."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (self.marker,))


@pytest.fixture
def saved(tmp_path: Path, model: PASamModel, processor) -> Path:
    directory = tmp_path / "pa-sam"
    model.save_pretrained(directory)
    processor.save_pretrained(directory)
    return directory


def _copy(saved: Path, name: str) -> Path:
    return Path(shutil.copytree(saved, saved.parent / name))


def _edit_config(directory: Path, edit) -> None:
    config = json.loads((directory / "config.json").read_text())
    edit(config)
    (directory / "config.json").write_text(json.dumps(config))


def _loaders():
    """Every public way to load a checkpoint directory."""
    return {
        "PASamModel.from_pretrained": PASamModel.from_pretrained,
        "AutoModel.from_pretrained": AutoModel.from_pretrained,
        "load_model_and_processor": lambda path: load_model_and_processor(str(path)),
    }


def _assert_one_clear_error(directory: Path, *expected: str, loaders=None) -> None:
    for name, load in (loaders or _loaders()).items():
        with pytest.raises(ModelLoadError) as raised:
            load(directory)
        message = str(raised.value)
        assert "\n" not in message, name
        for part in expected:
            assert part in message, f"{name}: {part!r} not in {message!r}"


def test_round_trip_is_strict_and_exact(saved: Path, model: PASamModel) -> None:
    reloaded, info = PASamModel.from_pretrained(saved, output_loading_info=True)
    assert not any(info[key] for key in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, reloaded.state_dict()[name]), name


@pytest.mark.parametrize("keep", [0.5, 0.99, 5 / 1e9])
def test_truncated_safetensors_names_the_file(saved: Path, keep: float) -> None:
    weights = saved / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: max(5, int(len(data) * keep))])
    _assert_one_clear_error(saved, str(weights), "truncated or corrupt", "again")


def test_unknown_config_fields_are_named_with_a_suggestion(saved: Path) -> None:
    _edit_config(saved, lambda config: config["mask_decoder_config"].update(edge_mod="rgb"))
    _assert_one_clear_error(saved, "config.json", "unknown fields mask_decoder_config.edge_mod", "'edge_mode'")
    _edit_config(saved, lambda config: (config["mask_decoder_config"].pop("edge_mod"), config.update(multimask=True)))
    _assert_one_clear_error(saved, "unknown fields multimask (did you mean 'multimask_output'?)")


@pytest.mark.parametrize(
    ("remove", "named"),
    [
        (lambda config: config.pop("vision_config"), "missing fields vision_config"),
        (lambda config: config.pop("multimask_output"), "missing fields multimask_output"),
        (lambda config: config["mask_decoder_config"].pop("edge_mode"), "missing fields mask_decoder_config.edge_mo"),
        (lambda config: config["mask_decoder_config"].pop("adapter_layer_index"), "adapter_layer_index"),
    ],
)
def test_missing_config_fields_are_named(saved: Path, remove, named: str) -> None:
    _edit_config(saved, remove)
    _assert_one_clear_error(saved, "config.json", named)


def test_transformers_4_keys_from_hub_sam_configs_are_accepted(tmp_path: Path) -> None:
    """SAM configs on the Hub carry transformers 4.x generic keys; a PA-SAM config converted from one keeps them."""
    legacy = {"torchscript": False, "use_bfloat16": False, "tf_legacy_loss": False, "pruned_heads": {},
              "is_decoder": False, "tokenizer_class": None, "num_beams": 1, "max_length": 20, "torch_dtype": "float32"}
    small = PASamConfig.small()
    sam_config = SamConfig.from_dict({
        "model_type": "sam",
        **legacy,
        "vision_config": {**small.vision_config.to_dict(), **legacy},
        "prompt_encoder_config": {**small.prompt_encoder_config.to_dict(), **legacy},
        "mask_decoder_config": {"hidden_size": 32, "mlp_dim": 64, "num_attention_heads": 2,
                                "iou_head_hidden_dim": 32, **legacy},
    })
    PASamConfig.from_sam_config(sam_config).save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert "torchscript" in saved["vision_config"]  # the legacy keys really are there
    check_config_dict(saved, "config.json")


def test_checkpoints_of_other_architectures_are_rejected(tmp_path: Path) -> None:
    vit = ViTModel(ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                             image_size=32, patch_size=16))
    vit.save_pretrained(tmp_path / "vit")
    loaders = {name: load for name, load in _loaders().items() if name != "AutoModel.from_pretrained"}
    _assert_one_clear_error(tmp_path / "vit", "'vit'", "PA-SAM", loaders=loaders)
    small = PASamConfig.small()
    sam = SamModel(SamConfig(vision_config=small.vision_config.to_dict(),
                             prompt_encoder_config=small.prompt_encoder_config.to_dict(),
                             mask_decoder_config={"hidden_size": 32, "mlp_dim": 64, "num_attention_heads": 2,
                                                  "iou_head_hidden_dim": 32}))
    sam.save_pretrained(tmp_path / "sam")
    with pytest.raises(ModelLoadError, match="from_sam_pretrained"):
        PASamModel.from_pretrained(tmp_path / "sam")


def test_weights_that_do_not_fit_the_config_are_rejected(saved: Path) -> None:
    weights = load_file(saved / "model.safetensors")
    partial = _copy(saved, "partial")
    save_file({k: v for k, v in weights.items() if "prompt_adapter" not in k}, partial / "model.safetensors",
              metadata={"format": "pt"})
    _assert_one_clear_error(partial, "weights the model needs are missing", "mask_decoder.prompt_adapter.")
    extra = _copy(saved, "extra")
    save_file({**weights, "mask_decoder_ori.iou_token.weight": torch.zeros(1, 32)}, extra / "model.safetensors",
              metadata={"format": "pt"})
    _assert_one_clear_error(extra, "not part of PA-SAM", "mask_decoder_ori.iou_token.weight")
    resized = _copy(saved, "resized")
    _edit_config(resized, lambda config: config["mask_decoder_config"].update(hidden_size=64))
    _assert_one_clear_error(resized, "another shape than config.json implies")
    # transformers' explicit opt-in to re-initialise mismatched weights still works.
    PASamModel.from_pretrained(resized, ignore_mismatched_sizes=True)


def test_pickle_artifacts_are_refused_and_never_executed(saved: Path, model: PASamModel) -> None:
    only_pickle = _copy(saved, "pickle")
    (only_pickle / "model.safetensors").unlink()
    torch.save(model.state_dict(), only_pickle / "pytorch_model.bin")
    _assert_one_clear_error(only_pickle, "pytorch_model.bin", "safetensors only", "use_safetensors=False")
    # The documented way out for a trusted file, read with torch.load(weights_only=True).
    reloaded = PASamModel.from_pretrained(only_pickle, use_safetensors=False)
    assert torch.equal(reloaded.mask_decoder.iou_token.weight, model.mask_decoder.iou_token.weight)

    marker = saved.parent / MARKER_NAME
    malicious = _copy(only_pickle, "malicious")
    torch.save({**model.state_dict(), "payload": RunsCodeWhenUnpickled(marker)}, malicious / "pytorch_model.bin")
    with pytest.raises(ModelLoadError, match="would run code"):
        PASamModel.from_pretrained(malicious, use_safetensors=False)
    assert not marker.exists()


def test_release_pth_files_load_with_weights_only(tmp_path: Path, model: PASamModel) -> None:
    state = {name: tensor for name, tensor in model.state_dict().items() if name.startswith("mask_decoder.")}
    good = tmp_path / "decoder.pth"
    torch.save(state, good)
    loaded = load_pth_state_dict(good)
    assert loaded.keys() == state.keys() and all(torch.equal(loaded[k], state[k]) for k in state)

    marker = tmp_path / MARKER_NAME
    torch.save({"model": RunsCodeWhenUnpickled(marker)}, tmp_path / "evil.pth")
    with pytest.raises(ModelLoadError, match="evil.pth needs code execution"):
        load_pth_state_dict(tmp_path / "evil.pth")
    assert not marker.exists()

    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(good.read_bytes()[:1000])
    with pytest.raises(ModelLoadError, match="truncated.pth is not a readable PyTorch checkpoint"):
        load_pth_state_dict(truncated)
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_pth_state_dict(tmp_path / "missing.pth")
    torch.save([1, 2], tmp_path / "list.pth")
    with pytest.raises(ModelLoadError, match="not a state dict"):
        load_pth_state_dict(tmp_path / "list.pth")


def test_config_json_that_is_not_json_is_one_error(saved: Path) -> None:
    (saved / "config.json").write_text("{ not json")
    with pytest.raises(ModelLoadError, match="config.json is not valid JSON"):
        load_model_and_processor(str(saved))
