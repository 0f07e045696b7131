"""pasam_hf: PA-SAM (Prompt Adapter SAM) as a Hugging Face transformers model.

Importing the package registers PA-SAM with transformers' Auto classes (`AutoConfig`, `AutoModel`,
`AutoModelForMaskGeneration`, `AutoImageProcessor`, `AutoProcessor`), so `pipeline("mask-generation", model=DIR)`
works on a PA-SAM checkpoint directory.
"""

from __future__ import annotations

from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModel,
    AutoModelForMaskGeneration,
    AutoProcessor,
)

from .adapters import load_adapter, save_adapter, trainable_parameter_names
from .configuration_pasam import PASamConfig, PASamMaskDecoderConfig
from .conversion import convert_checkpoint
from .image_processing_pasam import (
    PASamImageProcessor,
    PASamImageProcessorPil,
    compute_adapter_pixel_values,
)
from .modeling_pasam import PASamImageSegmentationOutput, PASamModel
from .processing_pasam import PASamProcessor

__version__ = "0.1.0"


def _register() -> None:
    AutoConfig.register(PASamConfig.model_type, PASamConfig, exist_ok=True)
    AutoModel.register(PASamConfig, PASamModel, exist_ok=True)
    AutoModelForMaskGeneration.register(PASamConfig, PASamModel, exist_ok=True)
    image_processors = {"pil": PASamImageProcessorPil}
    if PASamImageProcessor is not PASamImageProcessorPil:
        image_processors["torchvision"] = PASamImageProcessor
    AutoImageProcessor.register(PASamConfig, image_processor_classes=image_processors, exist_ok=True)
    AutoProcessor.register(PASamConfig, PASamProcessor, exist_ok=True)
    # save_pretrained copies these modules next to the weights and records them in auto_map, so the checkpoint
    # also loads with trust_remote_code=True where pasam_hf is not installed.
    PASamConfig.register_for_auto_class()
    PASamModel.register_for_auto_class("AutoModelForMaskGeneration")
    # Both backends: an image processor saved with either one carries the code and the auto_map of both.
    PASamImageProcessor.register_for_auto_class("AutoImageProcessor")
    PASamImageProcessorPil.register_for_auto_class("AutoImageProcessor")
    PASamProcessor.register_for_auto_class("AutoProcessor")


_register()

__all__ = [
    "PASamConfig",
    "PASamImageProcessor",
    "PASamImageProcessorPil",
    "PASamImageSegmentationOutput",
    "PASamMaskDecoderConfig",
    "PASamModel",
    "PASamProcessor",
    "compute_adapter_pixel_values",
    "convert_checkpoint",
    "load_adapter",
    "save_adapter",
    "trainable_parameter_names",
]
