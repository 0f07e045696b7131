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

    image_processor_class = ("PASamImageProcessorPil", "PASamImageProcessor")

    @property
    def model_input_names(self):
        return list(self.image_processor.model_input_names + ["original_sizes", "reshaped_input_sizes"])


__all__ = ["PASamProcessor"]
