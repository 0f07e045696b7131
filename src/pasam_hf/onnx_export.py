"""ONNX export of PA-SAM's prompt side: prompt encoder + mask decoder with the prompt adapter.

The image encoder runs once per image; the prompt side runs once per click or box, which is what interactive
front ends (a browser, a C++ tool) want as a small graph of their own. The exported graph computes exactly
[`PASamModel.forward`] from precomputed image embeddings in eval mode: hard point mining is the plain top-k of
the uncertainty-weighted score map, and the output is the single refined mask.

Graph inputs (`B` images, `P` prompts per image, `N` points per prompt; `B`, `P` and `N` may vary):

- `image_embeddings` `(B, 256, 64, 64)`: `PASamModel.get_image_embeddings(pixel_values)`;
- `adapter_pixel_values` `(B, 4, 256, 256)`: as returned by [`PASamProcessor`];
- `input_boxes` `(B, P, 4)` float32 (x0, y0, x1, y1), or `input_points` `(B, P, N, 2)` float32 and `input_labels`
  `(B, P, N)` int64 (1 foreground, 0 background, -1 padding): in the model's input frame (the processor's
  `input_boxes` / `input_points`, i.e. the resized, padded 1024 x 1024 image).

Graph outputs: `pred_masks` `(B, P, 1, 256, 256)` low resolution mask logits (upscale them with
`PASamProcessor.post_process_masks`), `iou_scores` `(B, P, 1)` and `uncertainty_maps` `(B, P, 1, 64, 64)`.
The sizes quoted are SAM's (1024 input); other configs scale them.

Requires the `onnx` extra: `pip install "pasam-hf[onnx]"` (onnx, onnxscript; onnxruntime to run or check it).
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import torch
from torch import Tensor, nn

from .modeling_pasam import PASamModel

PROMPT_KINDS = ("boxes", "points")
DEFAULT_OPSET = 18
OUTPUT_NAMES = ("pred_masks", "iou_scores", "uncertainty_maps")
_INPUT_NAMES = {
    "boxes": ("image_embeddings", "adapter_pixel_values", "input_boxes"),
    "points": ("image_embeddings", "adapter_pixel_values", "input_points", "input_labels"),
}


class _PromptDecoder(nn.Module):
    """`PASamModel.forward` from image embeddings, returning the tensors the ONNX graph outputs."""

    def __init__(self, model: PASamModel):
        super().__init__()
        self.model = model

    def decode(self, image_embeddings: Tensor, adapter_pixel_values: Tensor, **prompts: Tensor):
        outputs = self.model(
            image_embeddings=image_embeddings,
            adapter_pixel_values=adapter_pixel_values,
            multimask_output=False,
            **prompts,
        )
        return outputs.pred_masks, outputs.iou_scores, outputs.uncertainty_maps


class BoxPromptDecoder(_PromptDecoder):
    """The box-prompt graph: `(image_embeddings, adapter_pixel_values, input_boxes) -> OUTPUT_NAMES`."""

    def forward(self, image_embeddings: Tensor, adapter_pixel_values: Tensor, input_boxes: Tensor):
        return self.decode(image_embeddings, adapter_pixel_values, input_boxes=input_boxes)


class PointPromptDecoder(_PromptDecoder):
    """The point-prompt graph: `(image_embeddings, adapter_pixel_values, input_points, input_labels) ->
    OUTPUT_NAMES`."""

    def forward(self, image_embeddings: Tensor, adapter_pixel_values: Tensor, input_points: Tensor, input_labels: Tensor):
        return self.decode(image_embeddings, adapter_pixel_values, input_points=input_points, input_labels=input_labels)


def _check_prompt(prompt: str) -> None:
    if prompt not in PROMPT_KINDS:
        raise ValueError(f"prompt={prompt!r} is not supported; use one of {', '.join(PROMPT_KINDS)}.")


def example_decoder_inputs(
    model: PASamModel, prompt: str = "boxes", batch_size: int = 2, num_prompts: int = 3, num_points: int = 2,
    seed: int = 0,
) -> dict[str, Tensor]:
    """Random inputs of the exported graph, named as its inputs: embeddings and adapter input in the model's
    dtype, boxes (each at least an eighth of the image on a side) or points with random 0/1 labels."""
    _check_prompt(prompt)
    generator = torch.Generator().manual_seed(seed)
    config = model.config
    side = config.prompt_encoder_config.image_embedding_size
    image_size = float(config.prompt_encoder_config.image_size)
    dtype = model.dtype
    inputs = {
        "image_embeddings": torch.randn(
            batch_size, config.mask_decoder_config.hidden_size, side, side, generator=generator
        ).to(dtype),
        "adapter_pixel_values": torch.randn(batch_size, 4, 4 * side, 4 * side, generator=generator).to(dtype),
    }
    if prompt == "boxes":
        corner = torch.rand(batch_size, num_prompts, 2, generator=generator) * image_size * 0.75
        extent = (0.125 + torch.rand(batch_size, num_prompts, 2, generator=generator) * 0.125) * image_size
        inputs["input_boxes"] = torch.cat([corner, corner + extent], dim=-1)
    else:
        inputs["input_points"] = torch.rand(batch_size, num_prompts, num_points, 2, generator=generator) * image_size
        inputs["input_labels"] = torch.randint(0, 2, (batch_size, num_prompts, num_points), generator=generator)
    return inputs


def export_decoder_onnx(
    model: PASamModel,
    path: str | os.PathLike,
    *,
    prompt: str = "boxes",
    num_prompts_dynamic: bool = True,
    num_prompts: int = 1,
    opset: int = DEFAULT_OPSET,
) -> Path:
    """Export the prompt encoder + mask decoder (with the prompt adapter) of `model` to one ONNX file.

    Args:
        model ([`PASamModel`]): exported in eval mode (its mode is restored afterwards), in its dtype.
        path (`str` or `os.PathLike`): the `.onnx` file to write (weights included, no side file).
        prompt (`str`, defaults to `"boxes"`): `"boxes"` (input `input_boxes`) or `"points"` (`input_points` and
            `input_labels`); see the module docstring for shapes.
        num_prompts_dynamic (`bool`, defaults to `True`): whether the number of prompts per image may vary; when
            `False` the graph takes exactly `num_prompts`. The batch size and the points per prompt always may.
        num_prompts (`int`, defaults to 1): the fixed prompt count of a static graph.
        opset (`int`, defaults to 18): ONNX opset version.

    Returns:
        `Path` of the written file.
    """
    _check_prompt(prompt)
    if num_prompts < 1:
        raise ValueError(f"num_prompts must be at least 1, got {num_prompts}.")
    if not isinstance(model, PASamModel):
        raise ValueError(
            f"export_decoder_onnx takes a PASamModel, got {type(model).__name__}; load one with "
            "PASamModel.from_pretrained or wrap SAM with PASamModel.from_sam_pretrained."
        )
    try:
        import onnxscript  # noqa: F401 - torch.onnx's exporter needs it; fail with the fix, not deep inside torch
    except ImportError as error:
        raise ImportError(
            f"ONNX export needs onnx and onnxscript ({error}); install them with: pip install \"pasam-hf[onnx]\"."
        ) from error
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{path} is a directory; pass the .onnx file to write, e.g. {path / 'pasam_decoder.onnx'}.")
    path.parent.mkdir(parents=True, exist_ok=True)

    wrapper = (BoxPromptDecoder if prompt == "boxes" else PointPromptDecoder)(model)
    # Example sizes of at least 2: the exporter would specialise a dynamic dimension traced at size 1.
    example = example_decoder_inputs(model, prompt, batch_size=2, num_prompts=3 if num_prompts_dynamic else num_prompts)
    batch = torch.export.Dim("batch", min=1)
    prompts = torch.export.Dim("num_prompts", min=1) if num_prompts_dynamic else None
    points = torch.export.Dim("points_per_prompt", min=1)
    per_input = {
        "image_embeddings": {0: batch},
        "adapter_pixel_values": {0: batch},
        "input_boxes": {0: batch, 1: prompts},
        "input_points": {0: batch, 1: prompts, 2: points},
        "input_labels": {0: batch, 1: prompts, 2: points},
    }
    names = _INPUT_NAMES[prompt]
    dynamic_shapes = {name: {axis: dim for axis, dim in per_input[name].items() if dim is not None} for name in names}

    was_training = model.training
    wrapper.eval()  # and with it the model
    try:
        with warnings.catch_warnings():
            # One Dim shared by several inputs (the batch) makes the exporter say it keeps only one of the names.
            warnings.filterwarnings("ignore", message=r".*will not be used, since it shares the same shape")
            torch.onnx.export(
                wrapper,
                tuple(example[name] for name in names),
                str(path),
                dynamo=True,
                input_names=list(names),
                output_names=list(OUTPUT_NAMES),
                dynamic_shapes=dynamic_shapes,
                opset_version=opset,
                # The decoder's weights (a few MB) travel inside the one file.
                external_data=False,
                verbose=False,
            )
    finally:
        model.train(was_training)
    return path


def compare_with_onnxruntime(
    model: PASamModel, path: str | os.PathLike, prompt: str = "boxes", batch_size: int = 2, num_prompts: int = 3,
    seed: int = 0,
) -> dict[str, float]:
    """Run the exported graph with onnxruntime and `model` (eval mode) on the same random inputs
    ([`example_decoder_inputs`]); returns the largest absolute difference of each output."""
    try:
        import onnxruntime
    except ImportError as error:
        raise ImportError(f"checking an ONNX export needs onnxruntime ({error}): pip install onnxruntime.") from error
    _check_prompt(prompt)
    inputs = example_decoder_inputs(model, prompt, batch_size=batch_size, num_prompts=num_prompts, seed=seed)
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    expected_names = [node.name for node in session.get_inputs()]
    if sorted(expected_names) != sorted(inputs):
        raise ValueError(
            f"{path} takes inputs {expected_names}, not those of a {prompt!r} export ({list(inputs)}); pass "
            f"the prompt kind it was exported with."
        )
    onnx_outputs = session.run(list(OUTPUT_NAMES), {name: value.numpy() for name, value in inputs.items()})
    was_training = model.training
    model.eval()
    try:
        wrapper = (BoxPromptDecoder if prompt == "boxes" else PointPromptDecoder)(model).eval()
        with torch.inference_mode():
            torch_outputs = wrapper(*(inputs[name] for name in _INPUT_NAMES[prompt]))
    finally:
        model.train(was_training)
    return {
        name: float((torch.from_numpy(onnx_value) - torch_value.float()).abs().max())
        for name, onnx_value, torch_value in zip(OUTPUT_NAMES, onnx_outputs, torch_outputs)
    }


__all__ = [
    "BoxPromptDecoder",
    "DEFAULT_OPSET",
    "OUTPUT_NAMES",
    "PROMPT_KINDS",
    "PointPromptDecoder",
    "compare_with_onnxruntime",
    "example_decoder_inputs",
    "export_decoder_onnx",
]
