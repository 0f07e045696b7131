"""PASamProcessor: SamProcessor whose image processor also returns the adapter input."""

from __future__ import annotations

from transformers.models.sam.processing_sam import SamProcessor


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


__all__ = ["PASamProcessor"]
