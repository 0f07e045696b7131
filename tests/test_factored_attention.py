"""PASamAttention's factored forms: the same attention as SAM's, with the projection moved onto the few tokens."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import tiny_config
from transformers.models.sam.modeling_sam import SamAttention

from pasam_hf import PASamConfig, PASamModel
from pasam_hf.modeling_pasam import PASamAttention


def _attentions(hidden_size: int = 32, heads: int = 4) -> tuple[PASamAttention, SamAttention]:
    config = PASamConfig().mask_decoder_config
    config.hidden_size, config.num_attention_heads = hidden_size, heads
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    ours = PASamAttention(config, downsample_rate=2)
    theirs = SamAttention(config, downsample_rate=2)
    theirs.load_state_dict(ours.state_dict())
    return ours, theirs


def _sam_reference(attention: SamAttention, query, key, value, query_position, key_position) -> torch.Tensor:
    """SAM's own attention on the per-prompt tensors SAM builds (everything repeated to P prompts)."""
    prompts = max(t.shape[1] for t in (query, key, value))
    full = [t.expand(t.shape[0], prompts, -1, -1) for t in (query, key, value)]
    query, key, value = full[0] + query_position, full[1] + key_position, full[2]
    return attention(query=query, key=key, value=value)[0]


# (query shape, key/value shape): the decoder's cases, with shared (P = 1) and per-prompt sides.
SHAPES = [
    ((2, 3, 5, 32), (2, 3, 40, 32)),  # tokens to per-prompt image tokens (block 2, the adapter)
    ((2, 3, 5, 32), (2, 1, 40, 32)),  # tokens to shared image tokens (block 1)
    ((2, 1, 40, 32), (2, 3, 5, 32)),  # shared image tokens to tokens (block 1)
    ((2, 3, 40, 32), (2, 3, 5, 32)),  # per-prompt image tokens to tokens
    ((1, 1, 6, 32), (1, 1, 30, 32)),  # one prompt
]


@pytest.mark.parametrize("query_shape, key_shape", SHAPES)
@pytest.mark.parametrize("form", ["projected", "token_queries", "token_keys"])
def test_every_form_matches_sam_attention_and_its_gradients(query_shape, key_shape, form: str) -> None:
    ours, theirs = _attentions()
    g = torch.Generator().manual_seed(1)
    query, key, value = (torch.randn(s, generator=g) for s in (query_shape, key_shape, key_shape))
    # The image side's positional embedding is shared by the prompts, as in the decoder.
    query_position = torch.randn(query_shape[0], 1, *query_shape[2:], generator=g)
    key_position = torch.randn(key_shape[0], 1, *key_shape[2:], generator=g)
    inputs = [query, key, value, query_position, key_position]
    for tensor in inputs:
        tensor.requires_grad_(True)
    ours._cheapest_form = lambda *args: form  # instance attribute: this module only

    got, weights = ours(query, key, value, query_position=query_position, key_position=key_position)
    expected = _sam_reference(theirs, *inputs)
    assert weights is None or form == "projected"
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)

    probe = torch.randn(expected.shape, generator=g)
    ours_grads = torch.autograd.grad((got * probe).sum(), inputs + list(ours.parameters()))
    theirs_grads = torch.autograd.grad((expected * probe).sum(), inputs + list(theirs.parameters()))
    for name, a, b in zip(["query", "key", "value", "query_pe", "key_pe"] + [n for n, _ in ours.named_parameters()],
                          ours_grads, theirs_grads):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4, msg=name)


def test_cost_model_at_sam_decoder_sizes() -> None:
    """ViT-B decoder sizes (C 256, width 128, 8 heads, 64 x 64 image tokens), 16 box prompts."""
    config = PASamConfig().mask_decoder_config
    attention = PASamAttention(config, downsample_rate=2)
    tokens, image, shared_image, few = (1, 16, 7, 256), (1, 16, 4096, 256), (1, 1, 4096, 256), (1, 1, 7, 256)
    # Per-prompt image tokens: projecting 7 tokens x 8 heads beats projecting 4096 image tokens.
    assert attention._cheapest_form(tokens, image) == "token_queries"
    assert attention._cheapest_form(image, tokens) == "token_keys"
    # Image tokens shared by the prompts are projected once per image: SAM's form is the cheaper.
    assert attention._cheapest_form(tokens, shared_image) == "projected"
    # One prompt: even a shared image side is cheaper factored.
    assert attention._cheapest_form(few, shared_image) == "token_queries"
    # As the decoder calls them, with the image positional embedding beside the image tokens.
    assert attention._cheapest_form(tokens, image, False, True) == "token_queries"  # block 2, adapter, final (T 7)
    assert attention._cheapest_form(shared_image, tokens, True, False) == "token_keys"  # block 1, image to tokens
    assert attention._cheapest_form((1, 16, 15, 256), image, False, True) == "projected"  # after mining (T 15)
    # Many tokens (heads x T above the width): SAM's form.
    assert attention._cheapest_form((1, 16, 32, 256), image) == "projected"
    assert attention._cheapest_form(image, (1, 16, 32, 256)) == "projected"


def test_attention_similarity_always_takes_sams_form() -> None:
    ours, theirs = _attentions()
    g = torch.Generator().manual_seed(2)
    query, key = torch.randn(1, 2, 5, 32, generator=g), torch.randn(1, 2, 40, 32, generator=g)
    similarity = torch.randn(2, 1, 5, 40, generator=g)

    def refuse(*args, **kwargs):
        raise AssertionError("a factored form ran with an attention_similarity")

    ours.factored_token_queries = ours.factored_token_keys = refuse
    ours.factored_form_threshold = math.inf
    got, _ = ours(query, key, key, attention_similarity=similarity)
    expected, _ = theirs(query=query, key=key, value=key, attention_similarity=similarity)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-6)


def _with_threshold(state: dict, threshold: float) -> PASamModel:
    model = PASamModel(tiny_config())
    model.load_state_dict(state)
    for module in model.modules():
        if isinstance(module, PASamAttention):
            module.factored_form_threshold = threshold
    return model


@pytest.mark.parametrize("training", [False, True])
def test_decoder_with_factored_forms_matches_sams_forms(training: bool) -> None:
    """The tiny test model's sizes pick SAM's form everywhere; forcing the factored forms changes nothing but
    rounding, in eval (top-k mining) and in training (Gumbel mining, gradients)."""
    torch.manual_seed(0)
    state = PASamModel(tiny_config()).state_dict()
    g = torch.Generator().manual_seed(3)
    pixels = torch.randn(2, 3, 128, 128, generator=g)
    xy = torch.rand(2, 3, 2, generator=g) * 60
    boxes = torch.cat([xy, xy + 8 + torch.rand(2, 3, 2, generator=g) * 60], dim=-1)
    results = []
    for threshold in (0.0, math.inf):
        model = _with_threshold(state, threshold).train(training)
        torch.manual_seed(7)  # the same Gumbel noise for both
        out = model(pixel_values=pixels, input_boxes=boxes)
        grads = None
        if training:
            loss = out.pred_masks.square().mean() + out.pa_masks.square().mean() + out.iou_scores.square().mean()
            parameters = [p for p in model.mask_decoder.parameters() if p.requires_grad]
            # Unused by both forms alike (e.g. the multimask tokens with one mask out); compared as None below.
            grads = torch.autograd.grad(loss, parameters, allow_unused=True)
        results.append((out, grads))
    (sams, sams_grads), (factored, factored_grads) = results
    assert torch.equal(sams.mined_point_coords, factored.mined_point_coords)
    for name in ("pred_masks", "iou_scores", "pa_masks"):
        torch.testing.assert_close(getattr(factored, name), getattr(sams, name), atol=1e-5, rtol=1e-5, msg=name)
    if training:
        assert [a is None for a in factored_grads] == [b is None for b in sams_grads]
        assert sum(a is not None for a in factored_grads) > len(factored_grads) // 2
        for a, b in zip(factored_grads, sams_grads):
            if a is not None:
                torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
