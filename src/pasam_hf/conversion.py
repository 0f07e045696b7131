"""Convert the original release's checkpoints into PA-SAM checkpoint directories.

Accepted sources (see docs/conversion.md):

- a segment-anything SAM checkpoint (`sam_vit_{b,l,h}_*.pth`): a PA-SAM with a zero-initialised adapter;
- the PA-SAM merged checkpoint (`sam_pa_epoch_N.pth`): SAM with the PA decoder under `mask_decoder.*` and SAM's
  original decoder under `mask_decoder_ori.*` (dropped);
- the decoder-only training checkpoint (`epoch_N.pth`: PA decoder keys without prefix, possibly with DDP's
  `module.` prefix), together with a SAM checkpoint that provides the trunk;
- a Hugging Face `SamModel` (or `PASamModel`) directory.

Every source key is mapped to a transformers name or dropped for a stated reason, and every weight of the target
model must be filled with a tensor of the right shape; anything else is one [`ConversionError`] listing the
offending keys. `.pth` files are read with `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import os
import re
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import HfApi, ModelCard, ModelCardData
from transformers import SamModel
from transformers.models.sam.configuration_sam import SamConfig, SamVisionConfig

from .configuration_pasam import RELEASE_LAYER_NORM_EPS, PASamConfig
from .loading import ModelLoadError, load_pth_state_dict
from .modeling_pasam import PASamMaskDecoder, PASamModel
from .processing_pasam import PASamProcessor

# ----------------------------------------------------------------------------------------------- key names
# segment-anything / release name -> transformers name (spec section 9). Applied in order, each at most once.
RELEASE_TO_HF_RENAMES: tuple[tuple[str, str], ...] = (
    (r"^image_encoder\.", "vision_encoder."),
    (r"^vision_encoder\.blocks\.", "vision_encoder.layers."),
    (r"^vision_encoder\.patch_embed\.proj\.", "vision_encoder.patch_embed.projection."),
    (r"^vision_encoder\.neck\.0\.", "vision_encoder.neck.conv1."),
    (r"^vision_encoder\.neck\.1\.", "vision_encoder.neck.layer_norm1."),
    (r"^vision_encoder\.neck\.2\.", "vision_encoder.neck.conv2."),
    (r"^vision_encoder\.neck\.3\.", "vision_encoder.neck.layer_norm2."),
    (r"^prompt_encoder\.point_embeddings\.", "prompt_encoder.point_embed."),
    (r"^prompt_encoder\.pe_layer\.positional_encoding_gaussian_matrix$", "shared_image_embedding.positional_embedding"),
    (r"^prompt_encoder\.mask_downscaling\.0\.", "prompt_encoder.mask_embed.conv1."),
    (r"^prompt_encoder\.mask_downscaling\.1\.", "prompt_encoder.mask_embed.layer_norm1."),
    (r"^prompt_encoder\.mask_downscaling\.3\.", "prompt_encoder.mask_embed.conv2."),
    (r"^prompt_encoder\.mask_downscaling\.4\.", "prompt_encoder.mask_embed.layer_norm2."),
    (r"^prompt_encoder\.mask_downscaling\.6\.", "prompt_encoder.mask_embed.conv3."),
    (r"^mask_decoder\.output_upscaling\.0\.", "mask_decoder.upscale_conv1."),
    (r"^mask_decoder\.output_upscaling\.1\.", "mask_decoder.upscale_layer_norm."),
    (r"^mask_decoder\.output_upscaling\.3\.", "mask_decoder.upscale_conv2."),
    # ViT blocks (norm1/2) and the decoder's two-way transformer (norm1..4, norm_final_attn).
    (r"\.norm(\d|_final_attn)\.", r".layer_norm\1."),
)
# segment-anything's MLP keeps its linear layers in `layers.{0..n-1}`; transformers' SamFeedForward names them
# proj_in / layers.{0..n-3} / proj_out.
_RELEASE_MLP = re.compile(
    r"^(mask_decoder\.(?:output_hypernetworks_mlps\.\d+|iou_prediction_head|prompt_adapter\.(?:uncertain|refined)_mlp))"
    r"\.layers\.(\d+)\.(.+)$"
)
# Keys of the release that PA-SAM does not use, with the reason reported to the user.
DROPPED_RELEASE_KEYS: tuple[tuple[str, str], ...] = (
    (r"^pixel_(mean|std)$", "SAM's normalisation constants (the processor normalises)"),
    (r"^mask_decoder_ori\.", "SAM's original mask decoder kept beside the PA decoder in the merged checkpoint"),
)
TIED_KEYS = {"prompt_encoder.shared_embedding.positional_embedding": "shared_image_embedding.positional_embedding"}
# Keys of the decoder-only release checkpoint that only the PA decoder has: how it is told from other files.
_PA_DECODER_MARKERS = ("guiding_conv.", "prompt_adapter.")
_DECODER_KEYS = ("transformer.", "iou_token.", "mask_tokens.", "output_upscaling.", "output_hypernetworks_mlps.",
                 "iou_prediction_head.")

# The released SAM image encoders: (hidden size, depth) -> name and global attention blocks.
VIT_VARIANTS: dict[tuple[int, int], tuple[str, list[int]]] = {
    (768, 12): ("vit_b", [2, 5, 8, 11]),
    (1024, 24): ("vit_l", [5, 11, 17, 23]),
    (1280, 32): ("vit_h", [7, 15, 23, 31]),
}
# SAM's decoder always has 8 heads; the tensors cannot tell (the heads split one projection).
DEFAULT_DECODER_ATTENTION_HEADS = 8
SOURCE_KINDS = {
    "sam": "SAM checkpoint",
    "pa_sam": "PA-SAM checkpoint",
    "pa_decoder": "PA-SAM decoder-only training checkpoint",
}


class ConversionError(ValueError):
    """A checkpoint cannot be converted; the message lists the offending keys or files and the fix."""


def _sample(names, limit: int = 8) -> str:
    names = sorted(map(str, names))
    return ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _mlp_depths(keys) -> dict[str, int]:
    depths: dict[str, int] = {}
    for key in keys:
        found = _RELEASE_MLP.match(key)
        if found:
            depths[found.group(1)] = max(depths.get(found.group(1), 0), int(found.group(2)) + 1)
    return depths


def release_key_to_hf(key: str, mlp_depths: dict[str, int] | None = None) -> str:
    """The transformers name of a release (segment-anything) key, e.g.
    `image_encoder.blocks.0.norm1.weight` -> `vision_encoder.layers.0.layer_norm1.weight`.

    `mlp_depths` gives the number of linear layers of each MLP (`{prefix: depth}`, defaults to SAM's 3)."""
    for pattern, replacement in RELEASE_TO_HF_RENAMES:
        key = re.sub(pattern, replacement, key, count=1)
    found = _RELEASE_MLP.match(key)
    if found:
        prefix, index, rest = found.group(1), int(found.group(2)), found.group(3)
        depth = (mlp_depths or {}).get(prefix, 3)
        name = "proj_in" if index == 0 else "proj_out" if index == depth - 1 else f"layers.{index - 1}"
        key = f"{prefix}.{name}.{rest}"
    return key


def release_state_dict_to_hf(
    state_dict: dict[str, torch.Tensor],
) -> tuple[dict[str, torch.Tensor], dict[str, list[str]]]:
    """Rename a release state dict (`image_encoder.*`, `prompt_encoder.*`, `mask_decoder.*`) to transformers
    names. Returns the renamed dict and the dropped keys grouped by reason."""
    dropped: dict[str, list[str]] = {}
    kept = {}
    for key, tensor in state_dict.items():
        reason = next((why for pattern, why in DROPPED_RELEASE_KEYS if re.search(pattern, key)), None)
        if reason is None:
            kept[key] = tensor
        else:
            dropped.setdefault(reason, []).append(key)
    depths = _mlp_depths(kept)
    renamed: dict[str, torch.Tensor] = {}
    for key, tensor in kept.items():
        new_key = release_key_to_hf(key, depths)
        if new_key in renamed:
            raise ConversionError(f"two keys of the checkpoint map to {new_key}; the file mixes two naming schemes.")
        renamed[new_key] = tensor
    return renamed, dropped


# ----------------------------------------------------------------------------------------------- config from shapes
def _count(state_dict: dict[str, torch.Tensor], prefix: str) -> int:
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    indices = {int(found.group(1)) for key in state_dict if (found := pattern.match(key))}
    return max(indices) + 1 if indices else 0


def detect_vit_variant(state_dict: dict[str, torch.Tensor]) -> tuple[str, dict[str, Any]]:
    """Read the image encoder's size from the tensors' shapes (transformers names).

    Returns `("vit_b" | "vit_l" | "vit_h" | "custom", vision_config_kwargs)`. Heads come from the relative position
    tables (`(2*window-1, head_dim)` in windowed blocks, `(2*grid-1, head_dim)` in global ones), so every size works,
    tiny test models included."""
    try:
        projection = state_dict["vision_encoder.patch_embed.projection.weight"]  # (hidden, channels, patch, patch)
        grid = state_dict["vision_encoder.pos_embed"].shape[1]  # (1, grid, grid, hidden)
        depth = _count(state_dict, "vision_encoder.layers.")
        rel_pos = [state_dict[f"vision_encoder.layers.{index}.attn.rel_pos_h"].shape for index in range(depth)]
        mlp_dim = state_dict["vision_encoder.layers.0.mlp.lin1.weight"].shape[0]
        output_channels = state_dict["vision_encoder.neck.conv1.weight"].shape[0]
        num_pos_feats = state_dict["shared_image_embedding.positional_embedding"].shape[1]
    except (KeyError, IndexError) as error:
        raise ConversionError(
            f"cannot read the image encoder's size: {error} is missing. The file is not a complete SAM checkpoint "
            "(segment-anything names image_encoder.*, prompt_encoder.*, mask_decoder.*)."
        ) from error
    hidden_size, patch_size = projection.shape[0], projection.shape[-1]
    head_dim = rel_pos[0][1]
    global_attn_indexes = [index for index, shape in enumerate(rel_pos) if shape[0] == 2 * grid - 1]
    window_rows = {shape[0] for shape in rel_pos if shape[0] != 2 * grid - 1}
    if len(window_rows) > 1 or hidden_size % head_dim:
        raise ConversionError(
            f"the image encoder's attention tables have inconsistent shapes ({sorted(window_rows)} rows, head size "
            f"{head_dim} for hidden size {hidden_size}); the checkpoint is not a SAM image encoder."
        )
    window_size = (window_rows.pop() + 1) // 2 if window_rows else SamVisionConfig().window_size
    name, canonical_global = VIT_VARIANTS.get((hidden_size, depth), ("custom", None))
    if canonical_global is not None and canonical_global != global_attn_indexes:
        name = "custom"
    return name, dict(
        hidden_size=hidden_size,
        num_hidden_layers=depth,
        num_attention_heads=hidden_size // head_dim,
        num_channels=projection.shape[1],
        image_size=grid * patch_size,
        patch_size=patch_size,
        output_channels=output_channels,
        window_size=window_size,
        global_attn_indexes=global_attn_indexes,
        mlp_dim=mlp_dim,
        num_pos_feats=num_pos_feats,
        qkv_bias="vision_encoder.layers.0.attn.qkv.bias" in state_dict,
    )


def infer_config(
    state_dict: dict[str, torch.Tensor],
    decoder_attention_heads: int = DEFAULT_DECODER_ATTENTION_HEADS,
    adapter_config: dict[str, Any] | None = None,
) -> tuple[PASamConfig, str]:
    """Build the [`PASamConfig`] a full state dict (transformers names) was trained with, from its shapes.

    The decoder's head count is not visible in the tensors: `decoder_attention_heads` (SAM's 8 by default) is used;
    pass a config to [`convert_checkpoint`] for other models. Returns the config and the ViT variant name."""
    variant, vision = detect_vit_variant(state_dict)
    try:
        hidden_size = state_dict["mask_decoder.mask_tokens.weight"].shape[1]  # (num_mask_tokens, hidden)
        attention_width = state_dict["mask_decoder.transformer.layers.0.cross_attn_token_to_image.q_proj.weight"]
        prompt_encoder = dict(
            hidden_size=state_dict["prompt_encoder.no_mask_embed.weight"].shape[1],
            image_size=vision["image_size"],
            patch_size=vision["patch_size"],
            mask_input_channels=state_dict["prompt_encoder.mask_embed.conv2.weight"].shape[0],
            num_point_embeddings=_count(state_dict, "prompt_encoder.point_embed."),
        )
        decoder = dict(
            hidden_size=hidden_size,
            num_multimask_outputs=state_dict["mask_decoder.mask_tokens.weight"].shape[0] - 1,
            num_hidden_layers=_count(state_dict, "mask_decoder.transformer.layers."),
            mlp_dim=state_dict["mask_decoder.transformer.layers.0.mlp.lin1.weight"].shape[0],
            attention_downsample_rate=hidden_size // attention_width.shape[0],
            iou_head_hidden_dim=state_dict["mask_decoder.iou_prediction_head.proj_in.weight"].shape[0],
            iou_head_depth=_count(state_dict, "mask_decoder.iou_prediction_head.layers.") + 2,
            num_attention_heads=decoder_attention_heads,
        )
    except KeyError as error:
        raise ConversionError(
            f"cannot read the model size: {error} is missing; the checkpoint is incomplete."
        ) from error
    if attention_width.shape[0] % decoder_attention_heads:
        raise ConversionError(
            f"the mask decoder's attention width {attention_width.shape[0]} is not divisible by "
            f"{decoder_attention_heads} heads; pass the model's config (--config DIR/config.json) or "
            "--decoder-heads N (in Python: config=... or decoder_attention_heads=N)."
        )
    config = PASamConfig(
        vision_config=vision,
        prompt_encoder_config=prompt_encoder,
        mask_decoder_config={**decoder, **(adapter_config or {})},
    )
    return config, variant


# ----------------------------------------------------------------------------------------------- sources
@dataclasses.dataclass
class ConvertedSource:
    """One input of a conversion, with its weights under transformers names."""

    path: Path
    kind: str  # "sam" | "pa_sam" | "pa_decoder"
    state_dict: dict[str, torch.Tensor]
    config: SamConfig | None = None
    dropped: dict[str, list[str]] = dataclasses.field(default_factory=dict)
    files: list[Path] = dataclasses.field(default_factory=list)
    notes: list[str] = dataclasses.field(default_factory=list)


def _unwrap(state: dict[str, Any], path: Path) -> dict[str, torch.Tensor]:
    # Training scripts often save {"model": state_dict, "epoch": ...}.
    for key in ("model", "state_dict"):
        if isinstance(state.get(key), dict) and not isinstance(state.get(key), torch.Tensor):
            state = state[key]
            break
    not_tensors = [key for key, value in state.items() if not isinstance(value, torch.Tensor)]
    if not_tensors:
        raise ConversionError(
            f"{path} is not a state dict: {_sample(not_tensors)} are not tensors. Save model.state_dict()."
        )
    return state


def _read_pth(path: Path) -> ConvertedSource:
    state = _unwrap(load_pth_state_dict(path), path)
    notes = []
    if any(key.startswith("module.") for key in state):
        # DistributedDataParallel wraps the model; its `module.` prefix is not part of the weight names.
        state = {key.removeprefix("module."): tensor for key, tensor in state.items()}
        notes.append(f"{path.name}: removed DDP's 'module.' prefix")
    keys = set(state)
    if any(key.startswith("image_encoder.") for key in keys):
        has_adapter = any(key.startswith(tuple(f"mask_decoder.{m}" for m in _PA_DECODER_MARKERS)) for key in keys)
        kind = "pa_sam" if has_adapter or any(key.startswith("mask_decoder_ori.") for key in keys) else "sam"
    elif any(key.startswith(_PA_DECODER_MARKERS) for key in keys):
        kind = "pa_decoder"
        state = {f"mask_decoder.{key}": tensor for key, tensor in state.items()}
    elif any(key.startswith(_DECODER_KEYS) for key in keys):
        raise ConversionError(
            f"{path} is a mask decoder without PA-SAM's adapter (no guiding_conv.* or prompt_adapter.* keys), e.g. "
            "SAM's sam_vit_*_maskdecoder.pth; convert the full SAM checkpoint (sam_vit_*.pth) instead."
        )
    else:
        raise ConversionError(
            f"{path} is neither a SAM / PA-SAM checkpoint (image_encoder.*, prompt_encoder.*, mask_decoder.*) nor "
            f"a PA-SAM decoder checkpoint (guiding_conv.*, prompt_adapter.*); its keys start with "
            f"{_sample({key.split('.')[0] for key in keys}, 5)}."
        )
    renamed, dropped = release_state_dict_to_hf(state)
    return ConvertedSource(path, kind, renamed, dropped=dropped, files=[path], notes=notes)


def _read_hf_directory(path: Path) -> ConvertedSource:
    config_file = path / "config.json"
    if not config_file.is_file():
        raise ConversionError(f"{path} is a directory without config.json; pass a .pth file or a SAM model directory.")
    model_type = json.loads(config_file.read_text()).get("model_type")
    files = sorted(path.glob("*.safetensors"))
    if model_type == "pa_sam":
        model = PASamModel.from_pretrained(path)
        return ConvertedSource(path, "pa_sam", model.state_dict(), config=model.config, files=files)
    if model_type != "sam":
        raise ConversionError(f"{path} holds a {model_type!r} model; convert SAM ('sam') or PA-SAM ('pa_sam') only.")
    model, info = SamModel.from_pretrained(path, output_loading_info=True)
    problems = {name: info.get(name) for name in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    problems = {name: keys for name, keys in problems.items() if keys}
    if problems:
        raise ConversionError(
            f"{path} does not hold the SAM its config.json describes: "
            + "; ".join(f"{name.replace('_', ' ')}: {_sample(keys)}" for name, keys in problems.items())
        )
    return ConvertedSource(path, "sam", model.state_dict(), config=model.config, files=files)


def read_source(path: str | os.PathLike) -> ConvertedSource:
    """Read one conversion input (a `.pth` file or a Hugging Face model directory) under transformers names."""
    path = Path(path).expanduser()
    if path.is_dir():
        return _read_hf_directory(path)
    if not path.exists():
        raise ConversionError(f"{path} does not exist; check the path.")
    return _read_pth(path)


# ----------------------------------------------------------------------------------------------- report
@dataclasses.dataclass
class ConversionReport:
    """What a conversion did: the variant, the sources with their sha256, dropped keys and notes."""

    output_dir: Path
    variant: str
    sources: list[dict[str, str]]
    num_weights: int
    dropped: dict[str, list[str]]
    adapter_initialised: bool
    notes: list[str]
    hub_url: str | None = None

    def summary(self) -> str:
        lines = [f"converted to {self.output_dir} (PA-SAM {self.variant}, {self.num_weights} tensors)"]
        lines += [f"  source {item['name']}: {item['kind']}, sha256 {item['sha256']}" for item in self.sources]
        lines += [f"  dropped {len(keys)} keys: {reason} ({_sample(keys, 3)})" for reason, keys in self.dropped.items()]
        if self.adapter_initialised:
            lines.append(
                "  the source is plain SAM: the PA-SAM adapter is new, zero-initialised (the model computes SAM's "
                "masks while point mining is off). Fine-tune it (pasam train) or convert released PA-SAM weights."
            )
        lines += [f"  note: {note}" for note in self.notes]
        if self.hub_url:
            lines.append(f"  pushed to {self.hub_url}")
        return "\n".join(lines)


def sha256_file(path: Path) -> str:
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


# ----------------------------------------------------------------------------------------------- assembly
def _combine(sources: list[ConvertedSource]) -> tuple[ConvertedSource, dict[str, torch.Tensor], list[str]]:
    """The trunk source and the full state dict: one SAM/PA-SAM source, or a trunk plus a decoder-only one."""
    kinds = [source.kind for source in sources]
    if len(sources) == 1:
        if kinds[0] == "pa_decoder":
            raise ConversionError(
                f"{sources[0].path} holds only the PA decoder; give the SAM checkpoint it was trained on first, "
                f"e.g. `pasam convert sam_vit_l_0b3195.pth {sources[0].path.name} --out DIR`."
            )
        return sources[0], dict(sources[0].state_dict), []
    if len(sources) != 2 or sorted(kinds) not in (["pa_decoder", "sam"], ["pa_decoder", "pa_sam"]):
        described = ", ".join(f"{source.path.name} ({SOURCE_KINDS[source.kind]})" for source in sources)
        raise ConversionError(
            f"two sources must be a SAM checkpoint (the trunk) and a PA-SAM decoder-only checkpoint; got {described}. "
            "A merged PA-SAM checkpoint (sam_pa_epoch_N.pth) converts on its own."
        )
    trunk, decoder = sorted(sources, key=lambda source: source.kind == "pa_decoder")
    state_dict = {key: tensor for key, tensor in trunk.state_dict.items() if not key.startswith("mask_decoder.")}
    state_dict.update(decoder.state_dict)
    replaced = [key for key in trunk.state_dict if key.startswith("mask_decoder.") and key in decoder.state_dict]
    # The decoder-only file normally holds the whole PA decoder; where it lacks SAM's frozen parts, the trunk's are
    # the ones it was trained with.
    from_trunk = [key for key in trunk.state_dict if key.startswith("mask_decoder.") and key not in decoder.state_dict]
    state_dict.update({key: trunk.state_dict[key] for key in from_trunk})
    notes = []
    if replaced:
        trunk.dropped.setdefault(f"{trunk.path.name}'s mask decoder, replaced by {decoder.path.name}", replaced)
    if from_trunk:
        notes.append(f"{len(from_trunk)} decoder tensors absent from {decoder.path.name} taken from {trunk.path.name}")
    return trunk, state_dict, notes


def _resolve_config(
    config: PASamConfig | SamConfig | str | os.PathLike | None,
    trunk: ConvertedSource,
    state_dict: dict[str, torch.Tensor],
    decoder_attention_heads: int,
    adapter_config: dict[str, Any] | None,
) -> tuple[PASamConfig, str]:
    if isinstance(config, (str, os.PathLike)):
        location = Path(config).expanduser()
        if not location.exists():
            raise ConversionError(f"config {location} does not exist; pass a config.json or a model directory.")
        config = SamConfig.from_pretrained(location)
        if config.model_type == "pa_sam":
            config = PASamConfig.from_pretrained(location)
    config = config if config is not None else trunk.config
    variant, _ = detect_vit_variant(state_dict)
    if config is None:
        return infer_config(state_dict, decoder_attention_heads, adapter_config)
    if not isinstance(config, PASamConfig) or adapter_config:
        config = PASamConfig.from_sam_config(config, **(adapter_config or {}))
    return config, variant


def _with_release_layer_norm_eps(config: PASamConfig, notes: list[str]) -> PASamConfig:
    """`config` with the two-way blocks' layer-norm eps of the release's code (reference section 10): a `.pth`
    checkpoint was trained with it whatever a given config.json says. A copy when it changes, with a note."""
    decoder_config = config.mask_decoder_config
    if decoder_config.layer_norm_eps == RELEASE_LAYER_NORM_EPS:
        return config
    notes.append(
        f"the config's two-way layer-norm eps {decoder_config.layer_norm_eps} replaced by the release's "
        f"{RELEASE_LAYER_NORM_EPS} (the .pth weights come from nn.LayerNorm's default)"
    )
    config = copy.deepcopy(config)
    config.mask_decoder_config.layer_norm_eps = RELEASE_LAYER_NORM_EPS
    return config


def _fresh_adapter(config: PASamConfig) -> dict[str, torch.Tensor]:
    """Randomly initialised adapter tensors (reproducibly: seed 0), under their PASamModel names."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        decoder = PASamMaskDecoder(config.mask_decoder_config)
    return {
        f"mask_decoder.{key}": tensor
        for key, tensor in decoder.state_dict().items()
        if key.startswith(("guiding_conv.", "prompt_adapter."))
    }


def build_model(config: PASamConfig, state_dict: dict[str, torch.Tensor], init_adapter: bool = False) -> PASamModel:
    """A [`PASamModel`] holding exactly `state_dict` (transformers names).

    Raises [`ConversionError`] listing missing keys, keys PA-SAM does not have, and shape mismatches. With
    `init_adapter`, the adapter's tensors (absent from a SAM checkpoint) are created and zero-initialised as in
    `PASamModel.from_sam_pretrained`."""
    state_dict = dict(state_dict)
    for tied, source in TIED_KEYS.items():
        if tied not in state_dict and source in state_dict:
            state_dict[tied] = state_dict[source]
    # On the meta device no memory is allocated: the checkpoint's tensors become the parameters (assign=True).
    with torch.device("meta"):
        model = PASamModel(config)
    if init_adapter:
        state_dict.update({key: tensor for key, tensor in _fresh_adapter(config).items() if key not in state_dict})
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    mismatched = [
        f"{key} {tuple(state_dict[key].shape)} vs {tuple(expected[key].shape)}"
        for key in sorted(set(expected) & set(state_dict))
        if state_dict[key].shape != expected[key].shape
    ]
    problems = [
        f"{len(missing)} weights of PA-SAM have no source tensor ({_sample(missing)})" if missing else "",
        f"{len(unexpected)} source tensors have no place in PA-SAM ({_sample(unexpected)})" if unexpected else "",
        f"{len(mismatched)} tensors have another shape than the config implies (checkpoint vs model: "
        f"{_sample(mismatched, 4)})" if mismatched else "",
    ]
    problems = [problem for problem in problems if problem]
    if problems:
        raise ConversionError(
            f"the checkpoint does not fit a {config.vision_config.hidden_size}-wide PA-SAM: {'; '.join(problems)}. "
            "Check that the files are complete SAM / PA-SAM release checkpoints (names as in segment-anything), and "
            "that --config (if given) describes them."
        )
    model.load_state_dict(state_dict, strict=True, assign=True)
    model.tie_weights()
    if init_adapter:
        model.zero_adapter_outputs_()
    return model.eval()


# ----------------------------------------------------------------------------------------------- model card
def model_card_templates() -> Path:
    """The folder holding the model card templates shipped with pasam_hf (`pa-sam-{variant}.md`)."""
    return Path(str(resources.files("pasam_hf") / "model_cards"))


def render_model_card(
    config: PASamConfig, variant: str, sources: list[dict[str, str]], model_id: str = "path/to/checkpoint"
) -> ModelCard:
    """The model card of a converted checkpoint: the variant's template filled with the sources (`name`, `kind`,
    `sha256`), the settings and the id to load it with."""
    import jinja2

    environment = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(model_card_templates())), keep_trailing_newline=True
    )
    card_data = ModelCardData(
        license="apache-2.0",
        library_name="transformers",
        pipeline_tag="mask-generation",
        tags=["pa-sam", "sam", "segment-anything", "image-segmentation", f"vit-{variant.removeprefix('vit_')}"],
    )
    from . import __version__

    content = environment.get_template(f"pa-sam-{variant.replace('_', '-')}.md").render(
        card_data=card_data.to_yaml(),
        variant=variant,
        sources=sources,
        edge_mode=config.mask_decoder_config.edge_mode,
        vision_hidden_size=config.vision_config.hidden_size,
        vision_layers=config.vision_config.num_hidden_layers,
        image_size=config.vision_config.image_size,
        pasam_version=__version__,
        model_id=model_id,
    )
    return ModelCard(content)


# ----------------------------------------------------------------------------------------------- entry points
def push_to_hub(
    output_dir: str | os.PathLike,
    repo_id: str,
    revision: str | None = None,
    private: bool = False,
    token: str | None = None,
    commit_message: str = "Upload PA-SAM converted with pasam_hf",
) -> str:
    """Upload a converted directory with `huggingface_hub` (creating the repo and the branch if needed); returns
    the commit URL."""
    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    if revision:
        api.create_branch(repo_id, branch=revision, exist_ok=True)
    commit = api.upload_folder(
        repo_id=repo_id, folder_path=str(output_dir), revision=revision, commit_message=commit_message
    )
    return str(getattr(commit, "commit_url", commit))


def convert_checkpoint(
    sources: str | os.PathLike | list[str | os.PathLike],
    output_dir: str | os.PathLike,
    config: PASamConfig | SamConfig | str | os.PathLike | None = None,
    adapter_config: dict[str, Any] | None = None,
    decoder_attention_heads: int = DEFAULT_DECODER_ATTENTION_HEADS,
    dtype: torch.dtype | None = None,
    overwrite: bool = False,
    push_to_hub_repo: str | None = None,
    revision: str | None = None,
    private: bool = False,
    token: str | None = None,
) -> ConversionReport:
    """Convert release checkpoints (or a Hugging Face SAM directory) into a PA-SAM checkpoint directory.

    Args:
        sources: One source (SAM `.pth`, merged PA-SAM `.pth`, HF SAM/PA-SAM directory), or two: a SAM checkpoint
            (the trunk) and a decoder-only PA-SAM checkpoint (`epoch_N.pth`).
        output_dir: Where `model.safetensors`, `config.json`, `preprocessor_config.json` and the model card
            (`README.md`) are written.
        config: The model's config (object, config.json or directory); by default read from an HF source, or
            built from the tensors' shapes (the ViT-B/L/H sizes are recognised).
        adapter_config: Adapter settings for [`PASamMaskDecoderConfig`], e.g. `{"edge_mode": "rgb"}`. Released
            weights need the default `edge_mode="official"`.
        decoder_attention_heads: Heads of the mask decoder when the config is built from shapes (SAM: 8).
        dtype: Cast floating-point weights to this dtype (default: keep the checkpoint's).
        overwrite: Allow writing into a non-empty `output_dir`.
        push_to_hub_repo: Also upload the directory to this Hub repo (with `revision`, `private`, `token`).

    Returns:
        A [`ConversionReport`]; `report.summary()` is what `pasam convert` prints.
    """
    paths = [sources] if isinstance(sources, (str, os.PathLike)) else list(sources)
    if not 1 <= len(paths) <= 2:
        raise ConversionError(f"give one or two sources, got {len(paths)}.")
    output_dir = Path(output_dir).expanduser()
    if output_dir.is_file() or (output_dir.is_dir() and any(output_dir.iterdir()) and not overwrite):
        raise ConversionError(
            f"output directory {output_dir} is not empty (or is a file); choose a new directory or pass --overwrite "
            "(overwrite=True in Python)."
        )
    try:
        read = [read_source(path) for path in paths]
    except ModelLoadError as error:
        raise ConversionError(str(error)) from error
    trunk, state_dict, combine_notes = _combine(read)
    notes = [note for source in read for note in source.notes] + combine_notes
    pasam_config, variant = _resolve_config(config, trunk, state_dict, decoder_attention_heads, adapter_config)
    if config is None and trunk.config is None:
        notes.append(
            f"config built from the tensors' shapes (decoder heads: {decoder_attention_heads}; pass --config, or "
            "config=... in Python, for other values)"
        )
    if trunk.config is None and "layer_norm_eps" not in (adapter_config or {}):
        pasam_config = _with_release_layer_norm_eps(pasam_config, notes)
    has_adapter = any(key.startswith("mask_decoder.guiding_conv.") for key in state_dict)
    model = build_model(pasam_config, state_dict, init_adapter=not has_adapter)
    if dtype is not None:
        model = model.to(dtype)

    described = [
        {"name": path.name, "kind": SOURCE_KINDS[source.kind], "sha256": sha256_file(path)}
        for source in read
        for path in (source.files or [source.path])
        if path.is_file()
    ]
    output_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(output_dir)
    PASamProcessor.from_model_config(model.config).save_pretrained(output_dir)
    card = render_model_card(model.config, variant, described, model_id=push_to_hub_repo or str(output_dir))
    card.save(output_dir / "README.md")
    dropped: dict[str, list[str]] = {}
    for source in read:
        for reason, keys in source.dropped.items():
            dropped.setdefault(reason, []).extend(keys)
    report = ConversionReport(
        output_dir=output_dir,
        variant=variant,
        sources=described,
        num_weights=len(model.state_dict()),
        dropped=dropped,
        adapter_initialised=not has_adapter,
        notes=notes,
    )
    if push_to_hub_repo:
        report.hub_url = push_to_hub(output_dir, push_to_hub_repo, revision=revision, private=private, token=token)
    return report


__all__ = [
    "ConversionError",
    "ConversionReport",
    "DROPPED_RELEASE_KEYS",
    "RELEASE_TO_HF_RENAMES",
    "VIT_VARIANTS",
    "build_model",
    "convert_checkpoint",
    "detect_vit_variant",
    "infer_config",
    "push_to_hub",
    "read_source",
    "release_key_to_hf",
    "release_state_dict_to_hf",
    "render_model_card",
]
