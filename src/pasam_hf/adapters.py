"""Adapter-only artifacts: the weights PA-SAM trains, saved apart from the SAM trunk they sit on.

A fine-tune changes only the guiding branch, the prompt adapter and three parts of SAM's mask decoder (the
upscaling convs + layer norm, the hypernetwork MLPs and the mask tokens; spec section 5): about 1 M parameters, a
few MB, instead of a whole SAM checkpoint. An adapter directory holds

- `adapter_model.safetensors`: those tensors under their `PASamModel` names;
- `adapter_config.json`: the adapter settings (edge mode, point mining, ...) and the trunk sizes the adapter fits.

Compose it with any SAM checkpoint of the same size: `PASamModel.from_sam_pretrained(sam, adapter=dir_or_hub_id)`,
or `load_adapter(PASamModel.from_pretrained(pasam_dir), dir_or_hub_id)` to swap the trained parts of a PA-SAM.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import hf_hub_download
from huggingface_hub.errors import EntryNotFoundError
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from transformers.models.sam.configuration_sam import SamMaskDecoderConfig

from .configuration_pasam import PASamConfig, PASamMaskDecoderConfig

ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"
ADAPTER_CONFIG_NAME = "adapter_config.json"
ADAPTER_FORMAT = "pasam-adapter"
ADAPTER_FORMAT_VERSION = 1
# Where `pasam train` saves the adapter next to the full model (and so where its --push-to-hub uploads it): an
# adapter given as such a directory or repo, without adapter files at its top, is read from there.
ADAPTER_SUBFOLDER = "adapter"

# The parameters PA-SAM trains (spec section 5). Everything else (image encoder, prompt encoder, the decoder's
# two-way transformer, IoU token and IoU head) stays SAM's, frozen.
TRAINABLE_PREFIXES = (
    "mask_decoder.guiding_conv.",
    "mask_decoder.prompt_adapter.",
    "mask_decoder.upscale_conv1.",
    "mask_decoder.upscale_layer_norm.",
    "mask_decoder.upscale_conv2.",
    "mask_decoder.output_hypernetworks_mlps.",
    "mask_decoder.mask_tokens.",
)
# Adapter settings: PASamMaskDecoderConfig's fields beyond SAM's. They change the masks, so they travel with the
# weights.
ADAPTER_SETTINGS = tuple(
    name for name in PASamMaskDecoderConfig.__dataclass_fields__ if name not in SamMaskDecoderConfig.__dataclass_fields__
)
# Settings that change which modules exist or where they sit: the weights only fit a model built with them.
ARCHITECTURE_SETTINGS = ("adapter_layer_index", "consistency_module")
# Trunk sizes an adapter must match: each changes a shape or the meaning of the adapter's inputs.
TRUNK_FIELDS = {
    "vision_config": ("hidden_size", "num_hidden_layers", "image_size", "patch_size", "output_channels"),
    "prompt_encoder_config": ("hidden_size", "image_embedding_size"),
    "mask_decoder_config": (
        "hidden_size", "num_hidden_layers", "num_attention_heads", "mlp_dim", "attention_downsample_rate",
        "num_multimask_outputs",
    ),
}


class AdapterError(ValueError):
    """An adapter cannot be saved or loaded; the message names the problem and the fix."""


def trainable_parameter_names(model: torch.nn.Module) -> list[str]:
    """Names of the parameters PA-SAM trains, in the model's order: guiding_conv, prompt_adapter, the decoder's
    upscaling convs + layer norm, the hypernetwork MLPs and the mask tokens. The trainer freezes all others, and
    [`save_adapter`] saves exactly these."""
    return [name for name, _ in model.named_parameters() if name.startswith(TRAINABLE_PREFIXES)]


def trunk_sizes(config: PASamConfig) -> dict[str, dict[str, Any]]:
    """The trunk sizes an adapter trained on a model with `config` fits (see `TRUNK_FIELDS`)."""
    return {
        sub_config: {field: getattr(getattr(config, sub_config), field) for field in fields}
        for sub_config, fields in TRUNK_FIELDS.items()
    }


def adapter_settings(config: PASamConfig) -> dict[str, Any]:
    """The adapter settings of `config` (its `PASamMaskDecoderConfig` fields that SAM does not have)."""
    return {name: getattr(config.mask_decoder_config, name) for name in ADAPTER_SETTINGS}


def save_adapter(model: torch.nn.Module, save_directory: str | os.PathLike, base_model: str | None = None) -> Path:
    """Save the trained PA-SAM weights of `model` (see [`trainable_parameter_names`]) and their config.

    Args:
        model: A [`PASamModel`].
        save_directory: Created if needed; receives `adapter_model.safetensors` and `adapter_config.json`.
        base_model: The SAM checkpoint the adapter was trained on (Hub id or path), recorded for the user; by
            default the model's `name_or_path`.

    Returns:
        The directory.
    """
    names = trainable_parameter_names(model)
    if not names or not isinstance(getattr(model, "config", None), PASamConfig):
        raise AdapterError(
            f"save_adapter needs a PASamModel, got {type(model).__name__}; wrap SAM with "
            "PASamModel.from_sam_pretrained first."
        )
    parameters = dict(model.named_parameters())
    # safetensors wants contiguous CPU tensors that share no memory.
    tensors = {name: parameters[name].detach().to("cpu").contiguous().clone() for name in names}
    directory = Path(save_directory).expanduser()
    directory.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(directory / ADAPTER_WEIGHTS_NAME), metadata={"format": "pt"})
    from . import __version__

    adapter_config = {
        "format": ADAPTER_FORMAT,
        "format_version": ADAPTER_FORMAT_VERSION,
        "pasam_hf_version": __version__,
        "base_model": base_model if base_model is not None else (model.config.name_or_path or None),
        "adapter_settings": adapter_settings(model.config),
        "trunk": trunk_sizes(model.config),
        "num_parameters": sum(tensor.numel() for tensor in tensors.values()),
    }
    (directory / ADAPTER_CONFIG_NAME).write_text(json.dumps(adapter_config, indent=2, sort_keys=True) + "\n")
    return directory


def _resolve(
    adapter: str | os.PathLike,
    revision: str | None,
    token: str | bool | None,
    cache_dir: str | os.PathLike | None = None,
    local_files_only: bool = False,
) -> tuple[Path, Path]:
    """Local paths of the adapter's config and weights: a directory, or files fetched from a Hub repo (into
    `cache_dir`, by default the Hugging Face cache; from there only with `local_files_only` or `HF_HUB_OFFLINE=1`)."""
    location = Path(adapter).expanduser()
    if location.is_dir():
        if not (location / ADAPTER_CONFIG_NAME).is_file() and (location / ADAPTER_SUBFOLDER).is_dir():
            location = location / ADAPTER_SUBFOLDER
        files = location / ADAPTER_CONFIG_NAME, location / ADAPTER_WEIGHTS_NAME
        absent = [path.name for path in files if not path.is_file()]
        if absent:
            raise AdapterError(
                f"{location} is not a PA-SAM adapter directory: {', '.join(absent)} missing. Write one with "
                "pasam_hf.adapters.save_adapter(model, dir)."
            )
        return files
    if location.exists() or str(adapter).startswith((".", "/", "~")) or str(adapter).count("/") != 1:
        raise AdapterError(f"adapter {adapter} is neither a local directory nor a Hub repo id (owner/name).")

    def download(name: str, subfolder: str | None = None) -> Path:
        return Path(hf_hub_download(str(adapter), name, subfolder=subfolder, revision=revision, token=token,
                                    cache_dir=cache_dir, local_files_only=local_files_only))

    try:
        try:
            subfolder, config_file = None, download(ADAPTER_CONFIG_NAME)
        except EntryNotFoundError as error:  # not in the repo (or, offline, not in the cache)
            try:
                subfolder, config_file = ADAPTER_SUBFOLDER, download(ADAPTER_CONFIG_NAME, ADAPTER_SUBFOLDER)
            except EntryNotFoundError:
                raise error from None
        return config_file, download(ADAPTER_WEIGHTS_NAME, subfolder)
    except Exception as error:  # huggingface_hub raises many types (offline, 404, gated); all mean "not fetched"
        raise AdapterError(
            f"could not get adapter {adapter!r} from the Hugging Face Hub ({type(error).__name__}: "
            f"{' '.join(str(error).split())[:200]}). Check the repo id and your connection, or pass a local directory."
        ) from error


def read_adapter_config(adapter: str | os.PathLike, revision: str | None = None,
                        token: str | bool | None = None, cache_dir: str | os.PathLike | None = None,
                        local_files_only: bool = False) -> dict[str, Any]:
    """The content of an adapter's `adapter_config.json` (local directory or Hub repo id; the Hub arguments are
    `hf_hub_download`'s)."""
    config_file, _ = _resolve(adapter, revision, token, cache_dir, local_files_only)
    try:
        config = json.loads(config_file.read_text())
    except json.JSONDecodeError as error:
        raise AdapterError(f"{config_file} is not valid JSON ({error}); save the adapter again.") from error
    if config.get("format") != ADAPTER_FORMAT or not isinstance(config.get("trunk"), dict):
        raise AdapterError(f"{config_file} is not a PA-SAM adapter config (format {config.get('format')!r}).")
    if config.get("format_version", 0) > ADAPTER_FORMAT_VERSION:
        raise AdapterError(
            f"{config_file} was written by a newer pasam_hf (format {config['format_version']}); upgrade pasam_hf."
        )
    return config


def check_adapter_fits(adapter_config: dict[str, Any], config: PASamConfig, name: str = "the adapter") -> None:
    """Raise [`AdapterError`] if an adapter was trained for another trunk size or another adapter architecture."""
    ours = trunk_sizes(config)
    differences = [
        f"{sub_config}.{field} {value} (model: {ours[sub_config][field]})"
        for sub_config, fields in adapter_config["trunk"].items()
        for field, value in fields.items()
        if sub_config in ours and field in ours[sub_config] and ours[sub_config][field] != value
    ]
    settings = adapter_config.get("adapter_settings", {})
    differences += [
        f"mask_decoder_config.{field} {settings[field]!r} (model: {getattr(config.mask_decoder_config, field)!r})"
        for field in ARCHITECTURE_SETTINGS
        if field in settings and settings[field] != getattr(config.mask_decoder_config, field)
    ]
    if differences:
        base = adapter_config.get("base_model")
        raise AdapterError(
            f"{name} does not fit this model: it was trained for {', '.join(differences)}. Load it onto a SAM "
            f"checkpoint of the same size{f' (it was trained on {base})' if base else ''}."
        )


def load_adapter(
    model: torch.nn.Module,
    adapter: str | os.PathLike,
    revision: str | None = None,
    token: str | bool | None = None,
    cache_dir: str | os.PathLike | None = None,
    local_files_only: bool = False,
) -> torch.nn.Module:
    """Load an adapter (a directory written by [`save_adapter`], or a Hub repo id) into a [`PASamModel`], in place.
    `revision`, `token`, `cache_dir` and `local_files_only` are `hf_hub_download`'s, for a Hub repo id.

    Checks that the adapter fits the model's trunk sizes and adapter architecture, that it holds exactly the
    trained parameters and that every shape matches; adapter settings that only change the computation (edge mode,
    point mining, Canny thresholds, Gumbel temperature) are copied into `model.config` and must match the processor
    (`PASamProcessor.from_model_config(model.config)`).

    Returns:
        `model`.
    """
    config_file, weights_file = _resolve(adapter, revision, token, cache_dir, local_files_only)
    adapter_config = read_adapter_config(config_file.parent)
    check_adapter_fits(adapter_config, model.config, name=f"adapter {adapter}")
    try:
        tensors = load_file(str(weights_file))
    except (SafetensorError, OSError) as error:
        raise AdapterError(
            f"{weights_file} is not a readable safetensors file ({error}): it is truncated or corrupt. Save or "
            "download the adapter again."
        ) from error
    expected = dict(model.named_parameters())
    names = set(trainable_parameter_names(model))
    missing, unexpected = sorted(names - set(tensors)), sorted(set(tensors) - names)
    mismatched = [
        f"{name} {tuple(tensors[name].shape)} (model: {tuple(expected[name].shape)})"
        for name in sorted(names & set(tensors))
        if tensors[name].shape != expected[name].shape
    ]
    if missing or unexpected or mismatched:
        problems = [
            f"missing {', '.join(missing[:5])}" if missing else "",
            f"not trained by PA-SAM {', '.join(unexpected[:5])}" if unexpected else "",
            f"other shapes {', '.join(mismatched[:5])}" if mismatched else "",
        ]
        raise AdapterError(
            f"adapter {adapter} does not fit this model: {'; '.join(p for p in problems if p)}. Save it again with "
            "save_adapter from a model of this size."
        )
    with torch.no_grad():
        for name, tensor in tensors.items():
            expected[name].copy_(tensor)
    for field, value in adapter_config.get("adapter_settings", {}).items():
        if field in ADAPTER_SETTINGS and field not in ARCHITECTURE_SETTINGS:
            setattr(model.config.mask_decoder_config, field, value)
    _apply_runtime_settings(model)
    return model


def _apply_runtime_settings(model: torch.nn.Module) -> None:
    """Copy the runtime adapter settings from the config onto the modules that cached them at construction."""
    decoder_config = model.config.mask_decoder_config
    adapter = model.mask_decoder.prompt_adapter
    adapter.num_mined_points = decoder_config.num_mined_points
    adapter.gumbel_tau = decoder_config.gumbel_tau


__all__ = [
    "ADAPTER_CONFIG_NAME",
    "ADAPTER_WEIGHTS_NAME",
    "AdapterError",
    "TRAINABLE_PREFIXES",
    "adapter_settings",
    "check_adapter_fits",
    "load_adapter",
    "read_adapter_config",
    "save_adapter",
    "trainable_parameter_names",
    "trunk_sizes",
]
