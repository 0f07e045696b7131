"""Checkpoint conversion, adapter-only artifacts and model cards.

Release checkpoints are synthesised here: a tiny PA-SAM's weights renamed *backwards* to segment-anything /
release names with a mapping written independently of `pasam_hf.conversion` (so a wrong rename in either fails).
No real checkpoint is stored or fetched; real ViT-B/L/H shapes appear only as meta tensors.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForMaskGeneration, SamConfig, SamModel, pipeline

from conftest import synthetic_image, tiny_config
from pasam_hf import PASamConfig, PASamModel, PASamProcessor
from pasam_hf.adapters import (
    ADAPTER_CONFIG_NAME,
    ADAPTER_WEIGHTS_NAME,
    AdapterError,
    load_adapter,
    save_adapter,
    trainable_parameter_names,
)
from pasam_hf.conversion import ConversionError, convert_checkpoint, detect_vit_variant, model_card_templates

# transformers name -> segment-anything / release name, applied in order (the specific ones first).
HF_TO_RELEASE = (
    (r"^vision_encoder\.patch_embed\.projection\.", "image_encoder.patch_embed.proj."),
    (r"^vision_encoder\.neck\.conv1\.", "image_encoder.neck.0."),
    (r"^vision_encoder\.neck\.layer_norm1\.", "image_encoder.neck.1."),
    (r"^vision_encoder\.neck\.conv2\.", "image_encoder.neck.2."),
    (r"^vision_encoder\.neck\.layer_norm2\.", "image_encoder.neck.3."),
    (r"^vision_encoder\.layers\.", "image_encoder.blocks."),
    (r"^vision_encoder\.", "image_encoder."),
    (r"^shared_image_embedding\.positional_embedding$", "prompt_encoder.pe_layer.positional_encoding_gaussian_matrix"),
    (r"^prompt_encoder\.point_embed\.", "prompt_encoder.point_embeddings."),
    (r"^prompt_encoder\.mask_embed\.conv1\.", "prompt_encoder.mask_downscaling.0."),
    (r"^prompt_encoder\.mask_embed\.layer_norm1\.", "prompt_encoder.mask_downscaling.1."),
    (r"^prompt_encoder\.mask_embed\.conv2\.", "prompt_encoder.mask_downscaling.3."),
    (r"^prompt_encoder\.mask_embed\.layer_norm2\.", "prompt_encoder.mask_downscaling.4."),
    (r"^prompt_encoder\.mask_embed\.conv3\.", "prompt_encoder.mask_downscaling.6."),
    (r"^mask_decoder\.upscale_conv1\.", "mask_decoder.output_upscaling.0."),
    (r"^mask_decoder\.upscale_layer_norm\.", "mask_decoder.output_upscaling.1."),
    (r"^mask_decoder\.upscale_conv2\.", "mask_decoder.output_upscaling.3."),
    # 3-layer MLPs: proj_in / layers.0 / proj_out -> layers.0 / 1 / 2 (one substitution, so no chaining).
    (r"(mlps\.\d+|iou_prediction_head|_mlp)\.(proj_in|layers\.0|proj_out)\.",
     lambda m: f"{m.group(1)}.layers.{MLP_INDEX[m.group(2)]}."),
    (r"\.layer_norm(\d|_final_attn)\.", r".norm\1."),
)


IGNORED_CONFIG_KEYS = {"transformers_version", "dtype", "_name_or_path"}
MLP_INDEX = {"proj_in": 0, "layers.0": 1, "proj_out": 2}


def to_release(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A PASamModel / SamModel state dict under the release's names, as `sam_pa_epoch_N.pth` would hold it."""
    release = {}
    for key, tensor in state_dict.items():
        if key == "prompt_encoder.shared_embedding.positional_embedding":
            continue  # tied to shared_image_embedding: one tensor in segment-anything
        for pattern, replacement in HF_TO_RELEASE:
            key = re.sub(pattern, replacement, key, count=1)
        release[key] = tensor.clone()
    release["pixel_mean"] = torch.tensor([123.675, 116.28, 103.53]).view(-1, 1, 1)
    release["pixel_std"] = torch.tensor([58.395, 57.12, 57.375]).view(-1, 1, 1)
    return release


def is_adapter(key: str) -> bool:
    return key.startswith(("mask_decoder.guiding_conv.", "mask_decoder.prompt_adapter."))


@pytest.fixture(scope="module")
def trained() -> PASamModel:
    """A tiny PA-SAM whose adapter is random (as after training), in eval mode."""
    torch.manual_seed(1)
    return PASamModel(tiny_config()).eval()


@pytest.fixture(scope="module")
def release(trained: PASamModel) -> dict[str, torch.Tensor]:
    """The merged release checkpoint: PA decoder under mask_decoder.*, SAM's decoder under mask_decoder_ori.*."""
    state = to_release(trained.state_dict())
    for key in list(state):
        if key.startswith("mask_decoder.") and not key.startswith(("mask_decoder.guiding_conv.",
                                                                   "mask_decoder.prompt_adapter.")):
            state["mask_decoder_ori." + key.removeprefix("mask_decoder.")] = state[key] + 1.0
    return state


def sam_only(release: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {key: tensor for key, tensor in release.items()
            if not key.startswith(("mask_decoder_ori.", "mask_decoder.guiding_conv.", "mask_decoder.prompt_adapter."))}


def decoder_only(release: dict[str, torch.Tensor], ddp: bool = False) -> dict[str, torch.Tensor]:
    prefix = "module." if ddp else ""
    return {prefix + key.removeprefix("mask_decoder."): tensor
            for key, tensor in release.items() if key.startswith("mask_decoder.")}


def save(tmp_path: Path, name: str, state: dict) -> Path:
    path = tmp_path / name
    torch.save(state, path)
    return path


def run_model(model: PASamModel, seed: int = 0) -> dict[str, torch.Tensor]:
    processor = PASamProcessor.from_model_config(model.config)
    inputs = processor(images=synthetic_image(96, 128, seed), input_boxes=[[[20, 16, 100, 80]]], return_tensors="pt")
    with torch.no_grad():
        outputs = model(**inputs)
    return {name: outputs[name] for name in ("pred_masks", "iou_scores", "uncertainty_maps", "refined_masks")}


def assert_same_outputs(first: dict, second: dict) -> None:
    for name in first:
        torch.testing.assert_close(first[name], second[name], rtol=0, atol=0, msg=name)


# ------------------------------------------------------------------------------------------------ conversion
def test_merged_checkpoint_round_trip_through_auto_class(tmp_path, trained, release):
    source = save(tmp_path, "sam_pa_epoch_20.pth", release)
    report = convert_checkpoint(source, tmp_path / "out", config=trained.config)
    assert report.variant == "custom" and not report.adapter_initialised
    dropped = {key for keys in report.dropped.values() for key in keys}
    assert {"pixel_mean", "pixel_std"} <= dropped
    assert {key for key in release if key.startswith("mask_decoder_ori.")} <= dropped
    assert {"model.safetensors", "config.json", "processor_config.json", "README.md"} <= {
        path.name for path in (tmp_path / "out").iterdir()
    }
    loaded = AutoModelForMaskGeneration.from_pretrained(tmp_path / "out").eval()
    assert isinstance(loaded, PASamModel)
    assert_same_outputs(run_model(loaded), run_model(trained))


def test_sam_plus_decoder_only_checkpoint_with_ddp_prefix(tmp_path, trained, release):
    trunk = save(tmp_path, "sam_vit_tiny.pth", sam_only(release))
    decoder = save(tmp_path, "epoch_20.pth", decoder_only(release, ddp=True))
    report = convert_checkpoint([trunk, decoder], tmp_path / "out", config=trained.config)
    assert any("module." in note for note in report.notes)
    assert [item["name"] for item in report.sources] == ["sam_vit_tiny.pth", "epoch_20.pth"]
    loaded = PASamModel.from_pretrained(tmp_path / "out").eval()
    for key, tensor in trained.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[key], tensor, rtol=0, atol=0, msg=key)


def test_decoder_only_alone_asks_for_the_trunk(tmp_path, release):
    decoder = save(tmp_path, "epoch_20.pth", decoder_only(release))
    with pytest.raises(ConversionError, match="give the SAM checkpoint"):
        convert_checkpoint(decoder, tmp_path / "out")


def test_config_from_shapes_and_plain_sam_gets_zero_adapter(tmp_path, trained, release):
    """Without a config the sizes come from the tensors (decoder heads: the default); a SAM source gives a PA-SAM
    that computes SAM's masks while point mining is off."""
    sam_config = trained.config
    heads = sam_config.mask_decoder_config.num_attention_heads
    source = save(tmp_path, "sam_vit_tiny.pth", sam_only(release))
    report = convert_checkpoint(source, tmp_path / "out", decoder_attention_heads=heads)
    assert report.adapter_initialised and "zero-initialised" in report.summary()
    converted = PASamModel.from_pretrained(tmp_path / "out").eval()
    for sub_config in ("vision_config", "prompt_encoder_config", "mask_decoder_config"):
        ours, theirs = getattr(converted.config, sub_config).to_dict(), getattr(sam_config, sub_config).to_dict()
        assert {k: v for k, v in ours.items() if k not in IGNORED_CONFIG_KEYS} == {
            k: v for k, v in theirs.items() if k not in IGNORED_CONFIG_KEYS
        }, sub_config

    # Built from the PA-SAM config's sub-configs, so with its two-way layer-norm eps (1e-5, the release's, which the
    # conversion gives): transformers' SAM default (1e-6) would differ from the converted model by the eps alone.
    sam = SamModel(SamConfig(**{name: getattr(sam_config, name).to_dict() for name in (
        "vision_config", "prompt_encoder_config", "mask_decoder_config")})).eval()
    eps = converted.config.mask_decoder_config.layer_norm_eps
    assert sam.mask_decoder.transformer.layers[0].layer_norm1.eps == eps == 1e-5
    sam.load_state_dict({k: v for k, v in trained.state_dict().items() if not is_adapter(k)}, strict=True)
    converted.set_point_mining(False)
    converted.config.mask_decoder_config.point_mining_in_training = False
    converted.train()  # point mining runs always in eval; training mode with mining off is the SAM-equal path
    processor = PASamProcessor.from_model_config(converted.config)
    inputs = processor(images=synthetic_image(), input_boxes=[[[20, 16, 100, 80]]], return_tensors="pt")
    with torch.no_grad():
        ours = converted(**inputs).pred_masks
        sam_inputs = {k: v for k, v in inputs.items() if k in ("pixel_values", "input_boxes")}
        theirs = sam(**sam_inputs, multimask_output=False).pred_masks
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


def test_hf_sam_directory_source(tmp_path, trained):
    sam_config = SamConfig(**{name: getattr(trained.config, name).to_dict() for name in (
        "vision_config", "prompt_encoder_config", "mask_decoder_config")})
    sam = SamModel(sam_config)
    sam.load_state_dict({k: v for k, v in trained.state_dict().items() if not is_adapter(k)}, strict=True)
    sam.save_pretrained(tmp_path / "sam")
    report = convert_checkpoint(tmp_path / "sam", tmp_path / "out")
    assert report.adapter_initialised
    assert report.sources[0]["name"] == "model.safetensors"
    converted = PASamModel.from_pretrained(tmp_path / "out")
    for key, tensor in sam.state_dict().items():
        torch.testing.assert_close(converted.state_dict()[key], tensor, rtol=0, atol=0, msg=key)


def test_missing_extra_and_misshapen_keys_are_listed(tmp_path, trained, release):
    broken = dict(release)
    del broken["mask_decoder.prompt_adapter.static_refined_token.weight"]
    broken["mask_decoder.hq_token.weight"] = torch.zeros(1, 32)
    broken["image_encoder.blocks.0.attn.proj.weight"] = torch.zeros(32, 31)
    with pytest.raises(ConversionError) as error:
        convert_checkpoint(save(tmp_path, "broken.pth", broken), tmp_path / "out", config=trained.config)
    message = str(error.value)
    assert "prompt_adapter.static_refined_token.weight" in message
    assert "mask_decoder.hq_token.weight" in message
    assert "vision_encoder.layers.0.attn.proj.weight (32, 31) vs (32, 32)" in message
    assert not (tmp_path / "out").exists()


def test_not_a_checkpoint_and_sam_decoder_only(tmp_path, release):
    with pytest.raises(ConversionError, match="neither a SAM"):
        convert_checkpoint(save(tmp_path, "other.pth", {"backbone.weight": torch.zeros(2)}), tmp_path / "a")
    sam_decoder = {k: v for k, v in decoder_only(release).items() if not k.startswith(("guiding", "prompt_adapter"))}
    with pytest.raises(ConversionError, match="without PA-SAM's adapter"):
        convert_checkpoint(save(tmp_path, "sam_vit_b_maskdecoder.pth", sam_decoder), tmp_path / "b")


def test_truncated_file_and_non_empty_output(tmp_path, trained, release):
    source = save(tmp_path, "sam_pa_epoch_20.pth", release)
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(source.read_bytes()[: source.stat().st_size // 2])
    with pytest.raises(ConversionError, match="truncated or corrupt"):
        convert_checkpoint(truncated, tmp_path / "out")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("x")
    with pytest.raises(ConversionError, match="not empty"):
        convert_checkpoint(source, tmp_path / "full", config=trained.config)


@pytest.mark.parametrize(
    "hidden_size, depth, global_attn, heads, name",
    [(768, 12, [2, 5, 8, 11], 12, "vit_b"), (1024, 24, [5, 11, 17, 23], 16, "vit_l"),
     (1280, 32, [7, 15, 23, 31], 16, "vit_h")],
)
def test_vit_variant_from_real_shapes(hidden_size, depth, global_attn, heads, name):
    config = PASamConfig(vision_config=dict(hidden_size=hidden_size, num_hidden_layers=depth,
                                            global_attn_indexes=global_attn, num_attention_heads=heads,
                                            mlp_dim=4 * hidden_size))
    with torch.device("meta"):
        state_dict = PASamModel(config).state_dict()
    variant, vision = detect_vit_variant(state_dict)
    assert variant == name
    assert (vision["hidden_size"], vision["num_hidden_layers"], vision["num_attention_heads"]) == (
        hidden_size, depth, heads)
    assert vision["global_attn_indexes"] == global_attn and vision["window_size"] == 14
    assert vision["image_size"] == 1024


def test_model_card_filled(tmp_path, trained, release):
    source = save(tmp_path, "sam_pa_epoch_20.pth", release)
    report = convert_checkpoint(source, tmp_path / "out", config=trained.config)
    card = (tmp_path / "out" / "README.md").read_text()
    assert report.sources[0]["sha256"] in card and "sam_pa_epoch_20.pth" in card
    assert "91.2" in card and "84.5" in card and "2401.13051" in card and "`official`" in card
    assert card.startswith("---\n") and "pipeline_tag: mask-generation" in card
    assert {f"pa-sam-{v}.md" for v in ("vit-b", "vit-l", "vit-h", "custom")} <= {
        p.name for p in model_card_templates().iterdir()}


def test_push_to_hub_uses_huggingface_hub(tmp_path, trained, release, monkeypatch):
    calls = []

    class FakeApi:
        def __init__(self, token=None):
            calls.append(("init", token))

        def create_repo(self, repo_id, **kwargs):
            calls.append(("create_repo", repo_id, kwargs["private"]))

        def create_branch(self, repo_id, branch, exist_ok):
            calls.append(("create_branch", repo_id, branch))

        def upload_folder(self, repo_id, folder_path, revision, commit_message):
            calls.append(("upload_folder", repo_id, Path(folder_path).name, revision))
            return type("CommitInfo", (), {"commit_url": "https://hf.co/me/pa-sam/commit/1"})()

    monkeypatch.setattr("pasam_hf.conversion.HfApi", FakeApi)
    source = save(tmp_path, "sam_pa_epoch_20.pth", release)
    report = convert_checkpoint(source, tmp_path / "out", config=trained.config, push_to_hub_repo="me/pa-sam",
                                revision="v1", private=True, token="hf_x")
    assert calls == [("init", "hf_x"), ("create_repo", "me/pa-sam", True), ("create_branch", "me/pa-sam", "v1"),
                     ("upload_folder", "me/pa-sam", "out", "v1")]
    assert report.hub_url.endswith("/commit/1")
    assert 'from_pretrained("me/pa-sam")' in (tmp_path / "out" / "README.md").read_text()


def test_pipeline_on_converted_directory(tmp_path, trained, release):
    convert_checkpoint(save(tmp_path, "sam_pa_epoch_20.pth", release), tmp_path / "out", config=trained.config)
    generator = pipeline("mask-generation", model=str(tmp_path / "out"), device="cpu")
    from PIL import Image

    result = generator(Image.fromarray(synthetic_image()), points_per_batch=8, points_per_crop=2,
                       pred_iou_thresh=0.0, stability_score_thresh=0.0)
    assert len(result["masks"]) >= 1 and result["masks"][0].shape == (96, 128)


# ------------------------------------------------------------------------------------------------ adapters
def test_trainable_parameter_names(trained):
    names = trainable_parameter_names(trained)
    assert "mask_decoder.mask_tokens.weight" in names and "mask_decoder.upscale_layer_norm.bias" in names
    assert any(name.startswith("mask_decoder.output_hypernetworks_mlps.3.") for name in names)
    assert any(name.startswith("mask_decoder.guiding_conv.6.") for name in names)
    assert not any(name.startswith(("vision_encoder.", "prompt_encoder.", "mask_decoder.transformer.",
                                    "mask_decoder.iou_")) for name in names)


def test_adapter_round_trip_onto_sam(tmp_path, trained):
    adapter_dir = save_adapter(trained, tmp_path / "adapter")
    weights = adapter_dir / ADAPTER_WEIGHTS_NAME
    trained_bytes = sum(p.numel() * 4 for n, p in trained.named_parameters() if n in trainable_parameter_names(trained))
    assert trained_bytes <= weights.stat().st_size < trained_bytes + 16_000
    assert weights.stat().st_size < 0.5 * sum(p.numel() * 4 for p in trained.parameters())
    saved = json.loads((adapter_dir / ADAPTER_CONFIG_NAME).read_text())
    assert saved["adapter_settings"]["edge_mode"] == "official"
    assert saved["trunk"]["vision_config"]["hidden_size"] == 32

    sam_config = SamConfig(**{name: getattr(trained.config, name).to_dict() for name in (
        "vision_config", "prompt_encoder_config", "mask_decoder_config")})
    sam = SamModel(sam_config)
    trunk = {k: v for k, v in trained.state_dict().items() if k not in trainable_parameter_names(trained)}
    sam.load_state_dict({k: v for k, v in trunk.items() if not is_adapter(k)}, strict=False)
    for name in trainable_parameter_names(trained):  # a SAM whose trained parts differ from the fine-tune
        if name in sam.state_dict():
            sam.state_dict()[name].copy_(trained.state_dict()[name] + 1)
    sam.save_pretrained(tmp_path / "sam")
    composed = PASamModel.from_sam_pretrained(str(tmp_path / "sam"), adapter=str(adapter_dir)).eval()
    assert_same_outputs(run_model(composed), run_model(trained))


def test_adapter_settings_travel_and_load_into_pasam(tmp_path, trained):
    torch.manual_seed(2)
    fine_tuned = PASamModel(tiny_config(edge_mode="rgb", num_mined_points=2)).eval()
    save_adapter(fine_tuned, tmp_path / "adapter")
    target = PASamModel(tiny_config()).eval()
    load_adapter(target, tmp_path / "adapter")
    assert target.config.mask_decoder_config.edge_mode == "rgb"
    assert target.mask_decoder.prompt_adapter.num_mined_points == 2
    for name in trainable_parameter_names(target):
        torch.testing.assert_close(target.state_dict()[name], fine_tuned.state_dict()[name], rtol=0, atol=0)


def test_adapter_for_another_trunk_is_refused(tmp_path, trained):
    save_adapter(trained, tmp_path / "adapter")
    wider = PASamModel(PASamConfig.small(vision_hidden_size=48))
    with pytest.raises(AdapterError, match=r"vision_config.hidden_size 32 \(model: 48\)"):
        load_adapter(wider, tmp_path / "adapter")
    other_layer = PASamModel(tiny_config(consistency_module="cross_attention"))
    with pytest.raises(AdapterError, match="consistency_module"):
        load_adapter(other_layer, tmp_path / "adapter")
    with pytest.raises(AdapterError, match="neither a local directory nor a Hub repo id"):
        load_adapter(trained, tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(AdapterError, match="adapter_config.json, adapter_model.safetensors missing"):
        load_adapter(trained, tmp_path / "empty")
    (tmp_path / "adapter" / ADAPTER_WEIGHTS_NAME).write_bytes(b"\x00" * 20)
    with pytest.raises(AdapterError, match="truncated or corrupt"):
        load_adapter(trained, tmp_path / "adapter")


# ------------------------------------------------------------------------------------------------ CLI
def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pasam_hf", "convert", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=120, env={**__import__("os").environ, "HF_HUB_OFFLINE": "1"})


@pytest.mark.parametrize("case", ["missing", "truncated", "decoder_alone", "bad_config"])
def test_cli_errors_are_one_line(tmp_path, release, case):
    if case == "missing":
        args = ["nowhere.pth", "--out", "out"]
    elif case == "truncated":
        (tmp_path / "bad.pth").write_bytes(b"PK\x03\x04 not a checkpoint")
        args = ["bad.pth", "--out", "out"]
    elif case == "decoder_alone":
        save(tmp_path, "epoch_20.pth", decoder_only(release))
        args = ["epoch_20.pth", "--out", "out"]
    else:
        save(tmp_path, "sam_pa_epoch_20.pth", release)
        args = ["sam_pa_epoch_20.pth", "--out", "out", "--config", "missing_config.json"]
    result = run_cli(*args, cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    first, *rest = result.stderr.strip().splitlines()
    assert first.startswith("pasam convert: error: ") and rest == ["(run with --debug for the full traceback)"]


def test_cli_converts(tmp_path, trained, release):
    save(tmp_path, "sam_pa_epoch_20.pth", release)
    trained.config.save_pretrained(tmp_path / "cfg")
    result = run_cli("sam_pa_epoch_20.pth", "--out", "out", "--config", "cfg", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "converted to out" in result.stdout and "mask_decoder_ori" in result.stdout
    assert (tmp_path / "out" / "model.safetensors").is_file()


def test_release_checkpoints_convert_with_the_release_layer_norm_eps(tmp_path, trained, release):
    """The release's two-way norms are nn.LayerNorm (eps 1e-5, reference section 10): a converted .pth gets that eps
    whether its config is built from shapes or given (a config.json saying transformers' 1e-6 is corrected, with a
    note); an explicit adapter setting still wins."""
    source = save(tmp_path, "sam_pa_epoch_20.pth", release)
    heads = trained.config.mask_decoder_config.num_attention_heads
    convert_checkpoint(source, tmp_path / "shapes", decoder_attention_heads=heads)
    assert PASamConfig.from_pretrained(tmp_path / "shapes").mask_decoder_config.layer_norm_eps == 1e-5
    old_config = PASamConfig.from_dict(trained.config.to_dict())
    old_config.mask_decoder_config.layer_norm_eps = 1e-6  # as configs were written before the fix
    report = convert_checkpoint(source, tmp_path / "given", config=old_config)
    assert PASamConfig.from_pretrained(tmp_path / "given").mask_decoder_config.layer_norm_eps == 1e-5
    assert old_config.mask_decoder_config.layer_norm_eps == 1e-6  # the caller's config is not changed
    assert "layer-norm eps 1e-06 replaced by the release's 1e-05" in report.summary()
    convert_checkpoint(source, tmp_path / "explicit", config=old_config, adapter_config={"layer_norm_eps": 1e-6})
    assert PASamConfig.from_pretrained(tmp_path / "explicit").mask_decoder_config.layer_norm_eps == 1e-6


def test_python_errors_name_the_python_argument_too(tmp_path):
    """convert_checkpoint is called from Python as well as by `pasam convert`: its advice names both spellings."""
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    with pytest.raises(ConversionError, match=r"pass --overwrite \(overwrite=True in Python\)"):
        convert_checkpoint(tmp_path / "release.pth", tmp_path / "out")
