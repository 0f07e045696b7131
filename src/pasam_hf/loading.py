"""Loading a model and its processor from a Hub id or a local directory, with errors a user can act on."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from huggingface_hub.errors import (
    EntryNotFoundError,
    GatedRepoError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

from .configuration_pasam import PASamConfig
from .image_processing_pasam import PASamImageProcessor
from .modeling_pasam import PASamModel
from .processing_pasam import PASamProcessor

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


class ModelLoadError(ValueError):
    """The model could not be loaded; the message says why and what to do."""


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
            # A SAM checkpoint ships SAM's processor config; PA-SAM's processor adds the edge channel to it.
            edge_mode = model.config.mask_decoder_config.edge_mode
            processor = PASamProcessor(image_processor=PASamImageProcessor(edge_mode=edge_mode))
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


__all__ = ["ModelLoadError", "load_model_and_processor", "resolve_dtype"]
