"""The decoder's guiding branch and upscaling as products over pixels: the same as running their convolution modules
(values and gradients, up to float rounding), and no convolution left in the decoder's compiled graph."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_config
from torch import nn

from pasam_hf import PASamConfig, PASamModel
from pasam_hf.modeling_pasam import PASamMaskDecoder, block_conv, pixelwise_transposed_conv


def _decoder(hidden_size: int = 32, seed: int = 0) -> PASamMaskDecoder:
    torch.manual_seed(seed)
    config = PASamConfig.small().mask_decoder_config
    config.hidden_size = hidden_size
    decoder = PASamMaskDecoder(config).eval()
    with torch.no_grad():  # non-trivial affine norms and biases (their defaults are 1 and 0)
        for module in decoder.modules():
            if isinstance(module, (nn.LayerNorm, nn.Conv2d, nn.ConvTranspose2d)) and module.bias is not None:
                module.bias.normal_()
            if isinstance(module, nn.LayerNorm):
                module.weight.normal_()
    return decoder


def _upscaled_images(decoder: PASamMaskDecoder, tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """SAM's upscaling with its modules: `(B, N, C)` tokens -> `(B, C / 8, 4h, 4w)`."""
    images = tokens.transpose(1, 2).reshape(tokens.shape[0], -1, height, width)
    upscaled = decoder.activation(decoder.upscale_layer_norm(decoder.upscale_conv1(images)))
    return decoder.activation(decoder.upscale_conv2(upscaled))


@pytest.mark.parametrize(("height", "width"), [(8, 8), (3, 5)])
def test_upscaling_matches_the_transposed_convolutions(height: int, width: int) -> None:
    decoder = _decoder()
    tokens = torch.randn(2, height * width, 32, requires_grad=True)
    expected = _upscaled_images(decoder, tokens, height, width)
    pixels = decoder.upscaled_pixels(tokens)
    assert pixels.shape == (2, height * width * 16, 4)
    ours = decoder.unblock_masks(pixels.transpose(-1, -2), height, width)  # (B, C / 8, 4h, 4w) images
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-6)
    grad = torch.randn_like(expected)
    expected_grads = torch.autograd.grad((expected * grad).sum(), [tokens, *decoder.parameters()], allow_unused=True)
    ours_grads = torch.autograd.grad((ours * grad).sum(), [tokens, *decoder.parameters()], allow_unused=True)
    for name, a, b in zip(["tokens", *dict(decoder.named_parameters())], ours_grads, expected_grads):
        assert (a is None) == (b is None), name
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("side", [32, 12])
def test_guiding_branch_matches_its_convolutions(side: int) -> None:
    decoder = _decoder()
    pixels = torch.randn(2, 4, side, side, requires_grad=True)
    expected = decoder.guiding_conv(pixels).flatten(2).transpose(1, 2)
    ours = decoder.guiding_tokens(pixels)
    assert ours.shape == (2, (side // 4) ** 2, 32)
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)
    grad = torch.randn_like(expected)
    params = list(decoder.guiding_conv.parameters())
    expected_grads = torch.autograd.grad((expected * grad).sum(), [pixels, *params])
    ours_grads = torch.autograd.grad((ours * grad).sum(), [pixels, *params])
    for a, b in zip(ours_grads, expected_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_block_forms_of_single_convolutions() -> None:
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 5, kernel_size=(2, 3), stride=(2, 3))
    image = torch.randn(2, 3, 4, 9)
    blocks = image.reshape(2, 3, 2, 2, 3, 3).permute(0, 2, 4, 3, 5, 1).flatten(-3)  # (B, rows, cols, kh * kw * C)
    torch.testing.assert_close(block_conv(conv, blocks), conv(image).permute(0, 2, 3, 1), rtol=1e-5, atol=1e-6)
    transposed = nn.ConvTranspose2d(3, 5, kernel_size=2, stride=2)
    pixels = torch.randn(2, 6, 3)  # one row of 6 pixels
    out = pixelwise_transposed_conv(transposed, pixels).reshape(2, 6, 2, 2, 5)  # (B, pixel, block row, col, C)
    expected = transposed(pixels.transpose(1, 2).unsqueeze(2))  # (B, C, 2, 12)
    torch.testing.assert_close(
        out.permute(0, 4, 2, 1, 3).reshape(2, 5, 2, 12), expected, rtol=1e-5, atol=1e-6
    )


def test_a_padded_convolution_is_refused() -> None:
    from pasam_hf.modeling_pasam import _check_patch_conv

    with pytest.raises(ValueError, match="kernel = stride"):
        _check_patch_conv(nn.Conv2d(4, 8, kernel_size=3, padding=1))
    with pytest.raises(ValueError, match="square kernel"):
        _check_patch_conv(nn.ConvTranspose2d(4, 8, kernel_size=(2, 3), stride=(2, 3)))


def test_no_convolution_in_the_compiled_decoder_graph() -> None:
    """A convolution in the graph turns on inductor's channels-last layout for the 4-D token tensors (see
    `PASamMaskDecoder`): the prompt-side forward must have none."""
    model = PASamModel(tiny_config()).eval()
    inputs = {
        "image_embeddings": torch.randn(1, model.config.mask_decoder_config.hidden_size, 8, 8),
        "adapter_pixel_values": torch.randn(1, 4, 32, 32),
        "input_boxes": torch.tensor([[[10.0, 10.0, 90.0, 80.0], [0.0, 5.0, 60.0, 120.0]]]),
        "multimask_output": False,
    }
    targets = []

    def backend(graph_module, example_inputs):
        for node in graph_module.graph.nodes:
            if node.op in ("call_function", "call_method", "call_module"):
                targets.append(getattr(node.target, "__name__", str(node.target)))
        return graph_module

    torch._dynamo.reset()
    with torch.no_grad():
        torch.compile(model, backend=backend, fullgraph=True)(**inputs)
    assert "linear" in targets and not [target for target in targets if "conv" in target.lower()], targets
