"""PASamProcessor: SamProcessor whose image processor also returns the adapter input."""

from __future__ import annotations

from typing import Any

from transformers.image_utils import ChannelDimension
from transformers.models.sam.processing_sam import SamProcessor, SamProcessorKwargs

from .validation import prepare_images, validate_prompts


class PASamProcessorKwargs(SamProcessorKwargs, total=False):
    """[`SamProcessor`]'s call arguments (PA-SAM's image processor settings, `edge_mode` and the others, go to
    `images_kwargs` like SAM's)."""


class PASamProcessor(SamProcessor):
    """[`SamProcessor`] (points, boxes, `post_process_masks`) around a [`PASamImageProcessor`], so its outputs also
    hold `adapter_pixel_values` of shape `(batch_size, 4, 256, 256)`.

    Example:

    ```python
    >>> processor = PASamProcessor.from_pretrained("path/to/pa-sam")
    >>> inputs = processor(images=image, input_boxes=[[[10, 20, 300, 400]]], return_tensors="pt")
    >>> sorted(inputs.keys())
    ['adapter_pixel_values', 'input_boxes', 'original_sizes', 'pixel_values', 'reshaped_input_sizes']
    ```
    """

    valid_processor_kwargs = PASamProcessorKwargs

    def __init__(self, image_processor):
        # A SAM repo ("facebook/sam-vit-base") ships SAM's image processor config: loading PASamProcessor from it
        # (or passing SAM's image processor) gives PA-SAM's image processor with the same settings.
        super().__init__(as_pasam_image_processor(image_processor))

    def __call__(
        self,
        images: Any = None,
        text: Any = None,
        segmentation_maps: Any = None,
        input_points: Any = None,
        input_labels: Any = None,
        input_boxes: Any = None,
        **kwargs,
    ):
        """[`SamProcessor.__call__`] with checked inputs (see `pasam_hf.validation` and docs/reliability.md).

        Images of any supported kind (PIL in any mode and EXIF orientation, numpy/torch in HWC or CHW, uint8,
        uint16, bool or float) are brought to upright RGB uint8 first; prompts are checked against their image:
        non-finite, inverted, zero-area or fully outside boxes, points outside the image, label/point count
        mismatches and uneven prompt counts across the batch raise a `ValueError` naming the prompt; boxes partly
        outside are clipped (with a `PromptClippedWarning`); point groups of different lengths are padded with
        `point_pad_value` (-10), which the model ignores. Calling it without prompts only prepares the images.
        """
        # `text` is accepted and unused, as by SamProcessor (prompts are input_points, input_labels, input_boxes).
        # The layout applies to the caller's arrays; after prepare_images every image is (H, W, 3).
        images = prepare_images(
            images,
            data_format=kwargs.pop("input_data_format", None),
            convert_rgb=kwargs.get("do_convert_rgb") is not False,
        )
        pad_value = kwargs.get("point_pad_value")
        pad_value = self.point_pad_value if pad_value is None else pad_value
        prompts = validate_prompts(
            [image.shape[:2] for image in images], input_points, input_labels, input_boxes, pad_value=pad_value
        )
        encoding = super().__call__(
            images=images,
            text=text,
            segmentation_maps=segmentation_maps,
            input_points=None if prompts.points is None else prompts.points.tolist(),
            input_labels=None if prompts.labels is None else prompts.labels.tolist(),
            input_boxes=None if prompts.boxes is None else prompts.boxes.tolist(),
            input_data_format=ChannelDimension.LAST,
            **kwargs,
        )
        if prompts.points is not None and (prompts.labels == pad_value).any():
            # SamProcessor rescales every coordinate; padding points keep the pad value, as SAM's own padding does.
            encoding["input_points"][encoding["input_labels"] == pad_value] = pad_value
        return encoding

    def save_pretrained(self, save_directory, *args, **kwargs):
        """[`ProcessorMixin.save_pretrained`] without side effects: transformers sets `auto_map` on a processor
        registered for the Auto classes while saving it, so the saved one would differ (`to_dict`) from itself
        reloaded and from one built from the same components."""
        had_auto_map = "auto_map" in self.__dict__
        try:
            return super().save_pretrained(save_directory, *args, **kwargs)
        finally:
            if not had_auto_map:
                self.__dict__.pop("auto_map", None)

    @classmethod
    def from_model_config(cls, config, **image_processor_kwargs) -> "PASamProcessor":
        """A processor whose sizes and edge mode match `config` (any input size, e.g. `PASamConfig.small()`)."""
        from .image_processing_pasam import PASamImageProcessor

        image_size = config.vision_config.image_size
        embedding_size = config.prompt_encoder_config.image_embedding_size
        decoder = config.mask_decoder_config
        kwargs = dict(
            size={"longest_edge": image_size},
            pad_size={"height": image_size, "width": image_size},
            mask_size={"longest_edge": 4 * embedding_size},
            mask_pad_size={"height": 4 * embedding_size, "width": 4 * embedding_size},
            adapter_size=4 * embedding_size,
            edge_mode=decoder.edge_mode,
            canny_low_threshold=decoder.canny_low_threshold,
            canny_high_threshold=decoder.canny_high_threshold,
        )
        kwargs.update(image_processor_kwargs)
        return cls(image_processor=PASamImageProcessor(**kwargs))

    @property
    def model_input_names(self):
        return list(self.image_processor.model_input_names + ["original_sizes", "reshaped_input_sizes"])


def as_pasam_image_processor(image_processor: Any) -> Any:
    """PA-SAM's image processor with the settings of `image_processor` if that is SAM's own
    (`SamImageProcessor` / `SamImageProcessorPil`, the same backend kept); anything else unchanged.

    SAM's config says nothing about the adapter input: the edge mode and Canny thresholds take PA-SAM's defaults
    (those of the released weights and of `PASamModel.from_sam_pretrained`), and the adapter input is a quarter of
    the padded model input, as in SAM's geometry (1024 -> 256).
    """
    from transformers.models.sam.image_processing_pil_sam import SamImageProcessorPil

    from .image_processing_pasam import PASamImageProcessor, PASamImageProcessorPil, _AdapterInputMixin

    if isinstance(image_processor, _AdapterInputMixin) or not isinstance(image_processor, _sam_image_processors()):
        return image_processor
    settings = {key: value for key, value in image_processor.to_dict().items() if key != "image_processor_type"}
    settings["adapter_size"] = image_processor.pad_size["height"] // 4
    pasam_class = PASamImageProcessorPil if isinstance(image_processor, SamImageProcessorPil) else PASamImageProcessor
    return pasam_class(**settings)


def _sam_image_processors() -> tuple[type, ...]:
    from transformers.models.sam.image_processing_pil_sam import SamImageProcessorPil

    try:
        from transformers.models.sam.image_processing_sam import SamImageProcessor
    except ImportError:  # pragma: no cover - without torchvision
        return (SamImageProcessorPil,)
    return (SamImageProcessor, SamImageProcessorPil)


__all__ = ["PASamProcessor", "PASamProcessorKwargs"]
