"""PA-SAM configuration: SAM's configuration plus the prompt adapter's settings."""

from __future__ import annotations

from huggingface_hub.dataclasses import strict
from transformers.configuration_utils import PreTrainedConfig
from transformers.models.sam.configuration_sam import (
    SamConfig,
    SamMaskDecoderConfig,
    SamPromptEncoderConfig,
    SamVisionConfig,
)

CONSISTENCY_MODULES = ("guided_gate", "cross_attention")
EDGE_MODES = ("official", "rgb")
# Epsilon of the two-way blocks' layer norms in the release and in the original SAM code (`nn.LayerNorm`'s default).
RELEASE_LAYER_NORM_EPS = 1e-5

# Written into every saved config so `trust_remote_code=True` works where pasam_hf is not installed:
# save_pretrained copies these modules next to the weights.
_AUTO_MAP = {
    "AutoConfig": "configuration_pasam.PASamConfig",
    "AutoModel": "modeling_pasam.PASamModel",
    "AutoModelForMaskGeneration": "modeling_pasam.PASamModel",
}


@strict
class PASamMaskDecoderConfig(SamMaskDecoderConfig):
    r"""
    SAM's mask decoder configuration plus the prompt adapter of PA-SAM.

    adapter_layer_index (`int`, *optional*, defaults to 1):
        Index of the two-way attention block that holds the prompt adapter. The release puts it in the second
        block (index 1); released weights need that value.
    num_mined_points (`int`, *optional*, defaults to 4):
        Number of hard points mined per sign (positive and negative) from the uncertainty-weighted score map.
    consistency_module (`str`, *optional*, defaults to `"guided_gate"`):
        How the guiding embedding meets the image embedding: `"guided_gate"` (elementwise product, as released)
        or `"cross_attention"` (the paper's ablation: the image tokens attend to the guiding embedding).
    edge_mode (`str`, *optional*, defaults to `"official"`):
        How the edge channel of the adapter input is made. `"official"` reproduces the release (Canny on the
        normalised image cast to uint8 with wrap-around) and is required for released weights; `"rgb"` runs
        Canny on the real RGB image and is the sensible choice for new training.
    canny_low_threshold / canny_high_threshold (`float`, *optional*, defaults to 10 / 100):
        Canny hysteresis thresholds of the edge channel.
    point_mining_in_training (`bool`, *optional*, defaults to `True`):
        Whether hard point mining runs in training mode. The release turns it on after a warm-up of 5 epochs;
        the trainer flips this switch. Point mining always runs in eval mode.
    gumbel_tau (`float`, *optional*, defaults to 1.0):
        Temperature of the Gumbel top-k relaxation used in training.
    layer_norm_eps (`float`, *optional*, defaults to 1e-5):
        Epsilon of the two-way transformer's block layer norms (`layer_norm1..4`; the only layers that read it).
        The release (and the original SAM code whose weights every SAM checkpoint holds) builds them as plain
        `nn.LayerNorm`, eps 1e-5; transformers' `SamMaskDecoderConfig` defaults to 1e-6, which moves trained-scale
        logits by ~1e-3 and flips pixels at mask borders. The LayerNorm2d layers (guiding branch, upscaling) keep
        1e-6, `layer_norm_final_attn` is `nn.LayerNorm`'s 1e-5 in both code bases.
    """

    model_type = "pa_sam_mask_decoder"

    adapter_layer_index: int = 1
    num_mined_points: int = 4
    consistency_module: str = "guided_gate"
    edge_mode: str = "official"
    canny_low_threshold: float = 10.0
    canny_high_threshold: float = 100.0
    point_mining_in_training: bool = True
    gumbel_tau: float = 1.0
    layer_norm_eps: float = RELEASE_LAYER_NORM_EPS

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        if self.consistency_module not in CONSISTENCY_MODULES:
            raise ValueError(
                f"consistency_module={self.consistency_module!r} is not supported; use one of {CONSISTENCY_MODULES}."
            )
        if self.edge_mode not in EDGE_MODES:
            raise ValueError(f"edge_mode={self.edge_mode!r} is not supported; use one of {EDGE_MODES}.")
        if not 0 <= self.adapter_layer_index < self.num_hidden_layers:
            raise ValueError(
                f"adapter_layer_index={self.adapter_layer_index} is outside the decoder's "
                f"{self.num_hidden_layers} two-way blocks; use a value in [0, {self.num_hidden_layers - 1}]."
            )
        if self.num_mined_points < 0:
            raise ValueError(f"num_mined_points must be >= 0, got {self.num_mined_points}.")


@strict
class PASamConfig(SamConfig):
    r"""
    Configuration of [`PASamModel`]: a [`SamConfig`] whose mask decoder config is a [`PASamMaskDecoderConfig`].

    multimask_output (`bool`, *optional*, defaults to `False`):
        Default of `PASamModel.forward(multimask_output=...)`. PA-SAM refines only the first mask token, so the
        single-mask output is the one the adapter improves; the three multimask outputs are SAM's.
    decoder_in_fp32 (`bool`, *optional*, defaults to `True`):
        When the model is loaded in bfloat16 or float16 (`from_pretrained(..., dtype=torch.bfloat16)`, or
        [`PASamModel.to_inference_dtype`]), keep the prompt side (positional embedding, prompt encoder, mask decoder
        with the adapter) in float32 and run only the image encoder in the low dtype. The decoder is a few percent
        of the compute for a handful of prompts, and its mask logits (a 32-channel dot product per pixel, then a
        threshold at 0) are where half precision flips pixels. `False` runs everything in the low dtype: faster
        for many prompts per image (automatic mask generation on a GPU), at some mask agreement with fp32
        (`benchmarks/bench_precision.py` measures both).

    Example:

    ```python
    >>> from pasam_hf import PASamConfig, PASamModel
    >>> config = PASamConfig()  # ViT-H sized, like facebook/sam-vit-huge
    >>> model = PASamModel(config)
    ```
    """

    model_type = "pa_sam"
    sub_configs_defaults = {
        "prompt_encoder_config": SamPromptEncoderConfig,
        "mask_decoder_config": PASamMaskDecoderConfig,
        "vision_config": SamVisionConfig,
    }

    vision_config: dict | PreTrainedConfig | None = None
    prompt_encoder_config: dict | PreTrainedConfig | None = None
    mask_decoder_config: dict | PreTrainedConfig | None = None
    multimask_output: bool = False
    decoder_in_fp32: bool = True

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        if isinstance(self.mask_decoder_config, SamMaskDecoderConfig) and not isinstance(
            self.mask_decoder_config, PASamMaskDecoderConfig
        ):
            self.mask_decoder_config = PASamMaskDecoderConfig(**self.mask_decoder_config.to_dict())
        if getattr(self, "auto_map", None) is None:
            self.auto_map = dict(_AUTO_MAP)

    @classmethod
    def small(
        cls,
        image_size: int = 128,
        hidden_size: int = 32,
        vision_hidden_size: int = 32,
        vision_layers: int = 2,
        **adapter_kwargs,
    ) -> "PASamConfig":
        """A small PA-SAM (random weights) for tests, the offline demo and quick experiments on a CPU.

        Same architecture as SAM/PA-SAM with narrow layers: patch 16, so the image embedding is `image_size/16`
        on a side and the adapter input `image_size/4`. `adapter_kwargs` go to [`PASamMaskDecoderConfig`].
        """
        heads = max(1, hidden_size // 16)
        return cls(
            vision_config=dict(
                hidden_size=vision_hidden_size,
                num_hidden_layers=vision_layers,
                num_attention_heads=max(1, vision_hidden_size // 16),
                image_size=image_size,
                patch_size=16,
                output_channels=hidden_size,
                global_attn_indexes=[vision_layers - 1],
                window_size=4,
                mlp_dim=2 * vision_hidden_size,
                num_pos_feats=hidden_size // 2,
            ),
            prompt_encoder_config=dict(
                hidden_size=hidden_size, image_size=image_size, patch_size=16, mask_input_channels=8
            ),
            mask_decoder_config=dict(
                hidden_size=hidden_size,
                mlp_dim=2 * hidden_size,
                num_attention_heads=heads,
                iou_head_hidden_dim=hidden_size,
                **adapter_kwargs,
            ),
        )

    @classmethod
    def from_sam_config(cls, sam_config: SamConfig, **adapter_kwargs) -> "PASamConfig":
        """Build a PA-SAM config with the same trunk as `sam_config`; `adapter_kwargs` go to the decoder config.

        A plain SAM config's `mask_decoder_config.layer_norm_eps` (transformers' 1e-6) is replaced by the 1e-5 of
        the code SAM's weights were trained with (see [`PASamMaskDecoderConfig`]); pass `layer_norm_eps=...` to
        keep another value. A PA-SAM config (`model_type` `"pa_sam"`) keeps its own."""
        decoder = sam_config.mask_decoder_config.to_dict()
        for key in ("model_type", "transformers_version", "architectures"):
            decoder.pop(key, None)
        if sam_config.model_type != PASamConfig.model_type:
            decoder["layer_norm_eps"] = RELEASE_LAYER_NORM_EPS
        decoder.update(adapter_kwargs)
        return cls(
            vision_config=sam_config.vision_config.to_dict(),
            prompt_encoder_config=sam_config.prompt_encoder_config.to_dict(),
            mask_decoder_config=decoder,
            initializer_range=sam_config.initializer_range,
        )


__all__ = ["PASamConfig", "PASamMaskDecoderConfig"]
