"""Reliability of loading: project artifacts are safetensors only, pickle files never run code, a broken
checkpoint (truncated weights, config.json with missing PA-SAM fields, another architecture, missing or
mis-shaped weights) gives one ModelLoadError naming the file and the fix, and whatever transformers loads (a
config with attributes PA-SAM does not declare) loads, with one warning naming them."""

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
from pasam_hf.loading import (
    ModelLoadError,
    UnknownConfigFieldsWarning,
    check_config_dict,
    load_model_and_processor,
    load_pth_state_dict,
)

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


def _loads_with_one_warning(directory: Path, *expected: str) -> None:
    """Every loader loads `directory` and warns once, naming `expected`."""
    for name, load in _loaders().items():
        with pytest.warns(UnknownConfigFieldsWarning) as warned:
            model = load(directory)
        assert model is not None, name
        messages = [str(w.message) for w in warned if issubclass(w.category, UnknownConfigFieldsWarning)]
        assert len(messages) == 1, (name, messages)
        for part in expected:
            assert part in messages[0], f"{name}: {part!r} not in {messages[0]!r}"


def test_unknown_config_fields_warn_once_with_a_suggestion(saved: Path) -> None:
    """As in transformers, unknown attributes load (and stay attributes); one warning names them, with the closest
    known name, because a misspelt field falls back to its default."""
    _edit_config(saved, lambda config: config.update(multimask=True))
    _loads_with_one_warning(saved, "config.json", "multimask (did you mean 'multimask_output'?)")
    assert PASamModel.from_pretrained(saved).config.multimask is True


def test_a_misspelt_adapter_setting_is_an_error_naming_both(saved: Path) -> None:
    """An adapter setting under another name is missing, and a default edge mode would change the masks."""
    _edit_config(saved, lambda config: config["mask_decoder_config"].update(edge_mod=config["mask_decoder_config"].pop("edge_mode")))
    _assert_one_clear_error(saved, "config.json", "missing fields mask_decoder_config.edge_mode",
                            "unknown fields mask_decoder_config.edge_mod (did you mean 'edge_mode'?)")


# Attributes transformers' own SAM test configs and SDPA tests set, which PA-SAM's config classes do not declare.
TRANSFORMERS_EXTRA_ATTRIBUTES = {
    "vision_config": {"dropout": 0.0, "initializer_factor": 1.0, "intermediate_size": 72, "projection_dim": 62,
                      "rel_pos_zero_init": False},
    "": {"layer_norm_eps": 1e-6, "batch_norm_eps": 1e-5, "rms_norm_eps": 1e-6, "norm_eps": 1e-5},
}


def _with_extra_attributes(config):
    for name, value in TRANSFORMERS_EXTRA_ATTRIBUTES["vision_config"].items():
        setattr(config.vision_config, name, value)
    for name, value in TRANSFORMERS_EXTRA_ATTRIBUTES[""].items():
        setattr(config, name, value)
    return config


def test_save_pretrained_of_a_config_with_extra_attributes_loads_back(tmp_path: Path, model: PASamModel) -> None:
    """D1: what save_pretrained wrote always loads back, by every loader and the pipeline, with the same weights."""
    from transformers import pipeline

    model.config = _with_extra_attributes(model.config)
    model.save_pretrained(tmp_path / "extra")
    _loads_with_one_warning(tmp_path / "extra", "vision_config.dropout", "vision_config.projection_dim",
                            "batch_norm_eps")
    reloaded = PASamModel.from_pretrained(tmp_path / "extra")
    assert reloaded.config.vision_config.projection_dim == 62 and reloaded.config.batch_norm_eps == 1e-5
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, reloaded.state_dict()[name]), name
    from pasam_hf import PASamProcessor

    PASamProcessor.from_model_config(model.config).save_pretrained(tmp_path / "extra")
    with pytest.warns(UnknownConfigFieldsWarning):
        generator = pipeline("mask-generation", model=str(tmp_path / "extra"))
    assert isinstance(generator.model, PASamModel)


def test_from_sam_pretrained_on_a_sam_config_with_extra_attributes_saves_and_reloads(tmp_path: Path) -> None:
    """D1: from_sam_pretrained copies a SAM config's extra attributes; the PA-SAM model it gives reloads."""
    small = PASamConfig.small()
    sam_config = SamConfig(vision_config=small.vision_config.to_dict(),
                           prompt_encoder_config=small.prompt_encoder_config.to_dict(),
                           mask_decoder_config={"hidden_size": 32, "mlp_dim": 64, "num_attention_heads": 2,
                                                "iou_head_hidden_dim": 32})
    SamModel(_with_extra_attributes(sam_config)).save_pretrained(tmp_path / "sam")
    model = PASamModel.from_sam_pretrained(str(tmp_path / "sam"))
    assert model.config.vision_config.dropout == 0.0
    model.save_pretrained(tmp_path / "pa-sam")
    with pytest.warns(UnknownConfigFieldsWarning, match="vision_config.initializer_factor"):
        reloaded = PASamModel.from_pretrained(tmp_path / "pa-sam")
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, reloaded.state_dict()[name]), name


def test_from_pretrained_with_a_state_dict_and_no_folder(model: PASamModel, config: PASamConfig) -> None:
    """D2: from_pretrained(None, config=..., state_dict=...) as for every transformers model."""
    reloaded = PASamModel.from_pretrained(None, config=config, state_dict=model.state_dict())
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, reloaded.state_dict()[name]), name
    incomplete = {key: value for key, value in model.state_dict().items() if "prompt_adapter" not in key}
    with pytest.raises(ModelLoadError, match="the given state_dict .* weights the model needs are missing"):
        PASamModel.from_pretrained(None, config=config, state_dict=incomplete)
    # No weights at all is a request for a fresh model (transformers' own tests use it), not a partial checkpoint.
    fresh = PASamModel.from_pretrained(None, config=config, state_dict={})
    assert set(fresh.state_dict()) == set(model.state_dict())


def test_output_loading_info_returns_the_report_with_a_warning(saved: Path) -> None:
    """With output_loading_info=True the caller gets transformers' report (and a warning) instead of an error."""
    from safetensors.torch import save_file as save

    save({"tensor": torch.tensor([1, 2])}, str(saved / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ModelLoadError, match="weights the model needs are missing"):
        PASamModel.from_pretrained(saved)
    with pytest.warns(UserWarning, match="weights the model needs are missing"):
        _, info = PASamModel.from_pretrained(saved, output_loading_info=True)
    assert "mask_decoder.prompt_adapter.cross_attn_token_to_image.q_proj.weight" in info["missing_keys"]
    assert info["unexpected_keys"] == {"tensor"} or list(info["unexpected_keys"]) == ["tensor"]


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
