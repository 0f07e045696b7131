"""Loading a model and its processor from a Hub id or a local directory, with errors a user can act on."""

from __future__ import annotations

import dataclasses
import difflib
import json
import os
import pickle
import re
import warnings
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from huggingface_hub.errors import (
    EntryNotFoundError,
    GatedRepoError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from safetensors import SafetensorError, safe_open
from transformers.configuration_utils import PreTrainedConfig
from transformers.models.sam.configuration_sam import (
    SamConfig,
    SamMaskDecoderConfig,
    SamPromptEncoderConfig,
    SamVisionConfig,
)

from .configuration_pasam import PASamConfig, PASamMaskDecoderConfig
from .modeling_pasam import PASamModel
from .processing_pasam import PASamProcessor

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


class ModelLoadError(ValueError):
    """The model could not be loaded; the message says why and what to do."""


# ------------------------------------------------------------------------------------ strict checkpoint loading
# transformers loads a checkpoint whatever its config.json holds (unknown fields become attributes, missing ones
# take defaults) and initialises missing or mis-shaped weights randomly with only a log line. For PA-SAM a missing
# adapter setting or weight means silently wrong masks, so `PASamModel.from_pretrained` goes through
# `load_pretrained_strict`; unknown fields are accepted as transformers accepts them, with a warning.

SUB_CONFIGS = {
    "vision_config": SamVisionConfig,
    "prompt_encoder_config": SamPromptEncoderConfig,
    "mask_decoder_config": PASamMaskDecoderConfig,
}
# Keys that transformers 4.x wrote into every config (its PretrainedConfig attributes, generation settings
# included). transformers 5 ignores them, and SAM configs from the Hub carry them into converted PA-SAM configs.
# `use_cache` is set on every model's config by transformers' `Trainer`, so models it saves carry it; PA-SAM has no
# cache, so its value changes nothing.
LEGACY_CONFIG_KEYS = frozenset({
    "_attn_implementation_autoset", "_commit_hash", "_name_or_path", "add_cross_attention", "attn_implementation",
    "bad_words_ids", "begin_suppress_tokens", "bos_token_id", "cross_attention_hidden_size",
    "decoder_start_token_id", "diversity_penalty", "do_sample", "early_stopping", "encoder_no_repeat_ngram_size",
    "eos_token_id", "experts_implementation", "exponential_decay_length_penalty", "finetuning_task",
    "forced_bos_token_id", "forced_eos_token_id", "is_decoder", "length_penalty", "max_length", "min_length",
    "name_or_path", "no_repeat_ngram_size", "num_beam_groups", "num_beams", "num_labels", "num_return_sequences",
    "output_attentions", "output_scores", "pad_token_id", "per_layer_config", "prefix", "pruned_heads",
    "remove_invalid_values", "repetition_penalty", "return_dict_in_generate", "sep_token_id", "suppress_tokens",
    "task_specific_params", "temperature", "tf_legacy_loss", "tie_encoder_decoder", "tokenizer_class", "top_k",
    "top_p", "torch_dtype", "torchscript", "typical_p", "use_bfloat16", "use_cache",
})
# Weight files transformers reads with pickle (torch.load): never read by default.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
_HUB_KWARGS = ("cache_dir", "force_download", "local_files_only", "proxies", "revision", "subfolder", "token")


def _own_fields(config_class: type) -> set[str]:
    return {field.name for field in dataclasses.fields(config_class)}


@lru_cache(maxsize=None)
def _known_config_keys(config_class: type) -> frozenset[str]:
    # Dataclass fields, plus attributes a config derives and saves (SamVisionConfig.scale, ...), plus legacy keys.
    derived = set(config_class().to_dict())
    return frozenset(_own_fields(config_class) | derived | {"model_type", "auto_map"} | LEGACY_CONFIG_KEYS)


def _required_config_keys() -> dict[str, set[str]]:
    """Fields every PA-SAM config.json must spell out: the sub-configs and what PA-SAM adds to SAM (the adapter
    settings change the masks but no weight shape, so a default would go unnoticed). SAM's own fields may be
    missing: a wrong default there changes weight shapes, which `check_loading_info` reports."""
    return {
        "": (_own_fields(PASamConfig) - _own_fields(SamConfig)) | set(SUB_CONFIGS),
        "mask_decoder_config": _own_fields(PASamMaskDecoderConfig) - _own_fields(SamMaskDecoderConfig),
    }


def _unknown(keys, known: frozenset[str], prefix: str) -> list[str]:
    found = []
    for key in sorted(set(keys) - known):
        close = difflib.get_close_matches(key, sorted(known - LEGACY_CONFIG_KEYS), n=1, cutoff=0.6)
        found.append(f"{prefix}{key}" + (f" (did you mean {close[0]!r}?)" if close else ""))
    return found


class UnknownConfigFieldsWarning(UserWarning):
    """A config.json holds attributes PA-SAM does not use; they are kept as attributes, as transformers does."""


def check_config_dict(config_dict: dict[str, Any], location: str, check_missing: bool = True) -> None:
    """Check a PA-SAM config the way silence would give wrong masks, and be as lenient as transformers otherwise.

    - another model type, or (with `check_missing`) a missing sub-config or PA-SAM adapter setting: one
      [`ModelLoadError`] naming them (a default adapter setting changes the masks but no weight shape);
    - attributes PA-SAM does not declare (transformers keeps them on the config, and SAM test and Hub configs
      carry some, e.g. `vision_config.dropout`): one [`UnknownConfigFieldsWarning`] naming them, with the closest
      known name, since a misspelt field falls back to its default.

    Args:
        config_dict: The content of config.json (or `config.to_dict()`).
        location: How the messages name the file, e.g. `"checkpoints/pa-sam/config.json"`.
        check_missing: Whether required fields must be present (not for a config object: it has every field).
    """
    model_type = config_dict.get("model_type")
    if model_type != PASamConfig.model_type:
        fix = (
            "load it with PASamModel.from_sam_pretrained (SAM weights plus a new adapter)"
            if model_type == "sam"
            else "point at a PA-SAM checkpoint, or convert the release's weights with `pasam convert`"
        )
        raise ModelLoadError(f"{location} describes a {model_type!r} model, not PA-SAM ('pa_sam'); {fix}.")
    unknown = _unknown(config_dict, _known_config_keys(PASamConfig), "")
    missing = []
    required = _required_config_keys()
    if check_missing:
        missing += sorted(required[""] - set(config_dict))
    for key, config_class in SUB_CONFIGS.items():
        sub_config = config_dict.get(key)
        if isinstance(sub_config, PreTrainedConfig):
            sub_config = sub_config.to_dict()
        if not isinstance(sub_config, dict):
            continue
        unknown += _unknown(sub_config, _known_config_keys(config_class), f"{key}.")
        if check_missing:
            missing += [f"{key}.{name}" for name in sorted(required.get(key, set()) - set(sub_config))]
    if missing:
        also = f" (it also has unknown fields {', '.join(unknown)})" if unknown else ""
        raise ModelLoadError(
            f"{location} has missing fields {', '.join(missing)}{also}. A missing PA-SAM setting would silently "
            "change the masks. Fix the file (compare with PASamConfig().to_dict()), or re-create it with "
            "`pasam convert` / save_pretrained; if it was written by a newer pasam_hf, upgrade pasam_hf."
        )
    if unknown:
        warnings.warn(
            f"{location} has fields PA-SAM does not use: {', '.join(unknown)}. They are kept as config "
            "attributes (as transformers does) and change nothing; if one is a misspelt PA-SAM field, that "
            "field has its default value: fix the name.",
            UnknownConfigFieldsWarning,
            stacklevel=2,
        )


def check_loading_info(info: dict[str, Any], source: str, allow_mismatched: bool = False) -> None:
    """Raise one [`ModelLoadError`] if `from_pretrained(..., output_loading_info=True)` left weights missing,
    unused or (unless `allow_mismatched`) re-initialised for a shape mismatch."""

    def sample(names) -> str:
        names = sorted(map(str, names))
        return ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")

    problems = []
    if info.get("missing_keys"):
        missing = info["missing_keys"]
        problems.append(f"{len(missing)} weights the model needs are missing ({sample(missing)})")
    if info.get("unexpected_keys"):
        problems.append(
            f"{len(info['unexpected_keys'])} weights are not part of PA-SAM ({sample(info['unexpected_keys'])})"
        )
    if info.get("mismatched_keys") and not allow_mismatched:
        mismatched = [f"{name}: {tuple(saved)} in the file, {tuple(expected)} in the model"
                      for name, saved, expected in info["mismatched_keys"]]
        problems.append(
            f"{len(mismatched)} weights have another shape than config.json implies ({sample(mismatched)})"
        )
    if problems:
        raise ModelLoadError(
            f"{source} does not hold the weights of the model its config.json describes: {'; '.join(problems)}. "
            "transformers would initialise those randomly. Use a complete checkpoint written by save_pretrained or "
            "`pasam convert` whose config.json and weights belong together."
        )


def _pickle_global(error: BaseException) -> str:
    """`" (it calls os.system)"`: the callable torch refused to import, when its message names one."""
    found = re.search(r"Unsupported global: GLOBAL (\S+)", str(error))
    return f" (it calls {found.group(1)})" if found else ""


def _weight_files(location: Path) -> tuple[list[Path], list[Path]]:
    if location == Path("") or not location.is_dir():
        return [], []
    safetensors = sorted(location.glob("*.safetensors"))
    pickles = sorted(path for path in location.iterdir() if path.suffix in PICKLE_SUFFIXES)
    return safetensors, pickles


def _unreadable_safetensors(files: list[Path]) -> list[Path]:
    bad = []
    for path in files:
        try:
            with safe_open(str(path), framework="pt"):
                pass
        except (SafetensorError, OSError):
            bad.append(path)
    return bad


@contextmanager
def readable_load_errors(source: str | os.PathLike | None) -> Iterator[None]:
    """Turn what `from_pretrained` raises for a corrupt, pickle-only or mismatched checkpoint into one
    [`ModelLoadError`] naming the file and the fix; other errors pass through unchanged. `source` is `None` when
    the weights come as a `state_dict` (`from_pretrained(None, config=..., state_dict=...)`)."""
    # No folder to inspect for a state_dict: a path that is no directory gives no weight files.
    location = Path(source).expanduser() if source is not None else Path("")
    try:
        yield
    except ModelLoadError:
        raise
    except SafetensorError as error:
        bad = _unreadable_safetensors(_weight_files(location)[0])
        named = ", ".join(map(str, bad)) if bad else f"a .safetensors file of {source}"
        raise ModelLoadError(
            f"{named} is not a readable safetensors file ({error}): it is truncated or corrupt, e.g. an interrupted "
            "download or copy. Download or copy it again (`hf download ... --force-download` for a Hub model), or "
            "re-save it with save_pretrained."
        ) from error
    except pickle.UnpicklingError as error:
        raise ModelLoadError(
            f"{source} holds a pickle weights file that torch.load(weights_only=True) refuses, because loading it "
            f"would run code{_pickle_global(error)}. Get a .safetensors version of the checkpoint."
        ) from error
    except OSError as error:
        message = " ".join(str(error).split())
        safetensors, pickles = _weight_files(location)
        if "safetensors" in message and pickles and not safetensors:
            raise ModelLoadError(
                f"{source} has only pickle weights ({', '.join(path.name for path in pickles)}) and pasam_hf loads "
                "safetensors only (a pickle file can run code when loaded). If you trust the file, convert it once: "
                "PASamModel.from_pretrained(path, use_safetensors=False).save_pretrained(path); release .pth files "
                "go through `pasam convert`."
            ) from error
        raise
    except RuntimeError as error:
        if "ignore_mismatched_sizes" not in str(error):
            raise
        raise ModelLoadError(
            f"the weights in {source} do not fit its config.json (tensor shapes differ; see the load report above): "
            "the config belongs to another model size. Use the config.json that was saved with these weights."
        ) from error


def load_pretrained_strict(load: Callable[..., Any], source: str | os.PathLike, *model_args, **kwargs) -> Any:
    """`load(source, *model_args, **kwargs)` (a `from_pretrained`), made strict for PA-SAM checkpoints.

    - config.json must be a PA-SAM config with every adapter setting; unknown fields only warn
      ([`check_config_dict`]);
    - weights are read from safetensors only, unless the caller passes `use_safetensors=False` explicitly (then
      transformers reads pickle files with `torch.load(weights_only=True)`);
    - every weight must be present, used and of the right shape ([`check_loading_info`]);
      `ignore_mismatched_sizes=True` from the caller allows re-initialising mismatched ones, as in transformers;
      with `output_loading_info=True` the caller gets the report (as from transformers) and a warning instead;
    - a truncated or corrupt file raises a [`ModelLoadError`] naming it.

    `source` may be `None` with `config=` and `state_dict=` (weights from memory), as for every transformers model.

    Returns what `load` returns: the model, or `(model, loading_info)` with `output_loading_info=True`.
    """
    wants_info = kwargs.pop("output_loading_info", False)
    allow_mismatched = bool(kwargs.pop("ignore_mismatched_sizes", False))
    kwargs.setdefault("use_safetensors", True)
    config = kwargs.get("config")
    with readable_load_errors(source):
        if isinstance(config, PreTrainedConfig) and (source is None or config.name_or_path != str(source)):
            # Built by the caller: its fields are all set, but unknown ones survive as attributes.
            check_config_dict(config.to_dict(), f"the config given for {source}", check_missing=False)
        else:
            # No config, a path, or one read from this very checkpoint (AutoModel, pipeline): check the file.
            config_source = source if config is None or isinstance(config, PreTrainedConfig) else config
            hub_kwargs = {key: kwargs[key] for key in _HUB_KWARGS if key in kwargs}
            config_dict, _ = PASamConfig.get_config_dict(config_source, **hub_kwargs)
            location = Path(config_source).expanduser() / "config.json"
            check_config_dict(config_dict, str(location) if location.is_file() else f"config.json of {config_source}")
        model, info = load(source, *model_args, output_loading_info=True, ignore_mismatched_sizes=True, **kwargs)
    where = "the given state_dict" if source is None else str(source)
    if source is None and isinstance(kwargs.get("state_dict"), dict) and not kwargs["state_dict"]:
        # No folder and an empty state_dict: no weights were given at all, so the caller asks for a freshly
        # initialised model (as `PASamModel(config)`), not for a checkpoint that lacks some.
        return (model, info) if wants_info else model
    if not wants_info:
        check_loading_info(info, where, allow_mismatched)
        return model
    # The caller asked for the loading report, as transformers returns it, and checks it: warn instead of raising.
    try:
        check_loading_info(info, where, allow_mismatched)
    except ModelLoadError as problem:
        warnings.warn(f"{problem} (returned in loading_info, as output_loading_info=True asked)", stacklevel=2)
    return model, info


def load_pth_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a PyTorch checkpoint (a release `.pth`) with `torch.load(weights_only=True)`: tensors and plain
    containers only, never code. Returns the mapping stored in the file (a state dict, or a dict holding one).

    Raises:
        ModelLoadError: the file is missing, truncated/corrupt, or needs code execution to load.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise ModelLoadError(f"checkpoint {path} does not exist; check the path.")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise ModelLoadError(
            f"{path} needs code execution to load{_pickle_global(error)}, which torch.load(weights_only=True) "
            "refuses. Re-save it as a plain state dict (torch.save(model.state_dict())) where you trust it."
        ) from error
    except (RuntimeError, EOFError, OSError, ValueError) as error:
        raise ModelLoadError(
            f"{path} is not a readable PyTorch checkpoint ({' '.join(str(error).split())[:200]}): it is truncated or "
            "corrupt. Download or copy it again."
        ) from error
    if not isinstance(state, dict):
        raise ModelLoadError(f"{path} holds a {type(state).__name__}, not a state dict; save model.state_dict().")
    return state


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype:
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ModelLoadError(f"unknown dtype {dtype!r}; use one of {sorted(set(DTYPES))}.")
    return DTYPES[dtype]


def _local_model_type(path: Path) -> str | None:
    config_file = path / "config.json"
    if not config_file.is_file():
        raise ModelLoadError(
            f"{path} is a directory without config.json, so it is not a model checkpoint; point --model at a "
            "directory written by save_pretrained or `pasam convert`, or at a Hub id."
        )
    try:
        return json.loads(config_file.read_text()).get("model_type")
    except json.JSONDecodeError as error:
        raise ModelLoadError(f"{config_file} is not valid JSON ({error}); re-create it with `pasam convert`.") from error


def load_model_and_processor(
    model_id_or_path: str,
    device: str | torch.device = "cpu",
    dtype: str | torch.dtype | None = None,
    revision: str | None = None,
) -> tuple[PASamModel, PASamProcessor]:
    """Load a PA-SAM model (or a SAM checkpoint, wrapped with a fresh adapter) and its processor, in eval mode.

    Raises:
        ModelLoadError: with a one-line explanation (missing directory, unknown Hub id, Hub unreachable, wrong
            architecture).
    """
    torch_dtype = resolve_dtype(dtype)
    path = Path(model_id_or_path).expanduser()
    looks_local = path.exists() or model_id_or_path.startswith((".", "/", "~")) or model_id_or_path.count("/") > 1
    if looks_local and not path.exists():
        raise ModelLoadError(f"model directory {model_id_or_path} does not exist; check the path.")
    try:
        model_type = _local_model_type(path) if path.is_dir() else PASamConfig.get_config_dict(
            model_id_or_path, revision=revision
        )[0].get("model_type")
        if model_type == "sam":
            with readable_load_errors(model_id_or_path):
                model = PASamModel.from_sam_pretrained(model_id_or_path, revision=revision, dtype=torch_dtype)
        elif model_type == "pa_sam":
            model = PASamModel.from_pretrained(model_id_or_path, revision=revision, dtype=torch_dtype)
        else:
            raise ModelLoadError(
                f"{model_id_or_path} holds a {model_type!r} model; pasam needs a PA-SAM checkpoint (model_type "
                "'pa_sam') or a SAM one (model_type 'sam'). Convert release files with `pasam convert`."
            )
        try:
            processor = PASamProcessor.from_pretrained(model_id_or_path, revision=revision)
        except (OSError, ValueError, TypeError):
            # No processor config (PASamProcessor turns SAM's own into PA-SAM's): the one the model's sizes imply.
            processor = PASamProcessor.from_model_config(model.config)
    except (RepositoryNotFoundError, GatedRepoError) as error:
        raise ModelLoadError(
            f"no model {model_id_or_path!r} on the Hugging Face Hub (or it is private/gated: log in with "
            "`hf auth login`); check the id, or pass a local directory."
        ) from error
    except RevisionNotFoundError as error:
        raise ModelLoadError(f"revision {revision!r} does not exist in {model_id_or_path}.") from error
    except (LocalEntryNotFoundError, EntryNotFoundError) as error:
        raise ModelLoadError(
            f"could not get {model_id_or_path!r}: the Hugging Face Hub is unreachable and the model is not in the "
            "local cache. Connect to the internet, or pass a local directory (see `pasam convert`)."
        ) from error
    except OSError as error:
        message = " ".join(str(error).split())
        if "connect" in message.lower() or "offline" in message.lower() or "resolve" in message.lower():
            raise ModelLoadError(
                f"could not get {model_id_or_path!r}: the Hugging Face Hub is unreachable and the model is not in "
                "the local cache. Connect to the internet, or pass a local directory (see `pasam convert`)."
            ) from error
        raise ModelLoadError(f"could not load {model_id_or_path!r}: {message}") from error
    model.to(device).eval()
    return model, processor


__all__ = [
    "ModelLoadError",
    "UnknownConfigFieldsWarning",
    "check_config_dict",
    "check_loading_info",
    "load_model_and_processor",
    "load_pretrained_strict",
    "load_pth_state_dict",
    "readable_load_errors",
    "resolve_dtype",
]
