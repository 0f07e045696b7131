"""PASamModel: shapes, adapter semantics against the reference spec, SAM parity, attention backends."""

from __future__ import annotations

import math
import platform

import cv2
import numpy as np
import pytest
import torch
from conftest import tiny_config
from transformers import SamModel

from pasam_hf import PASamConfig, PASamModel, PASamProcessor
from pasam_hf.modeling_pasam import gumbel_top_k

IMAGE_SIZE = 128
EMBED = IMAGE_SIZE // 16


def _pixels(batch_size: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch_size, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(seed))


def _boxes(batch_size: int = 2, num_boxes: int = 3) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    xy0 = torch.rand(batch_size, num_boxes, 2, generator=g) * IMAGE_SIZE / 2
    wh = torch.rand(batch_size, num_boxes, 2, generator=g) * IMAGE_SIZE / 2 + 4
    return torch.cat([xy0, xy0 + wh], dim=-1)


def _sam_from(model: PASamModel) -> SamModel:
    """A SamModel holding exactly the SAM weights of `model`, built from the model's own config: with the same
    two-way layer-norm eps (1e-5, the release's; transformers' SAM default is 1e-6), so only the adapter differs."""
    sam = SamModel(model.config).eval()
    adapter_keys = set(model.adapter_state_dict_keys())
    sam.load_state_dict({k: v for k, v in model.state_dict().items() if k not in adapter_keys}, strict=True)
    return sam


# --------------------------------------------------------------------------------------------- shapes and dtypes


@pytest.mark.parametrize("multimask", [False, True])
def test_box_prompts_shapes(model: PASamModel, multimask: bool) -> None:
    with torch.no_grad():
        out = model(pixel_values=_pixels(), input_boxes=_boxes(), multimask_output=multimask)
    num_masks = 3 if multimask else 1
    assert out.pred_masks.shape == (2, 3, num_masks, 4 * EMBED, 4 * EMBED)
    assert out.iou_scores.shape == (2, 3, num_masks)
    for name in ("coarse_masks", "refined_masks", "uncertainty_maps", "pa_masks"):
        assert getattr(out, name).shape == (2, 3, 1, EMBED, EMBED), name
        assert getattr(out, name).dtype == torch.float32
    k = model.config.mask_decoder_config.num_mined_points
    assert out.mined_point_coords.shape == (2, 3, 2 * k, 2)
    assert out.mined_point_labels.tolist() == [[[1] * k + [0] * k] * 3] * 2
    assert ((out.uncertainty_maps >= 0) & (out.uncertainty_maps <= 1)).all()
    # mined points lie on cell centres of the input frame
    cell = IMAGE_SIZE / EMBED
    assert torch.allclose((out.mined_point_coords / cell - 0.5).round(), out.mined_point_coords / cell - 0.5)


def test_points_masks_and_defaults(model: PASamModel) -> None:
    points = torch.rand(2, 4, 3, 2) * IMAGE_SIZE
    labels = torch.randint(0, 2, (2, 4, 3))
    with torch.no_grad():
        out = model(pixel_values=_pixels(), input_points=points, input_labels=labels)
        assert out.pred_masks.shape == (2, 4, 1, 4 * EMBED, 4 * EMBED)  # single mask is PA-SAM's default
        out = model(pixel_values=_pixels(1), input_points=points[:1, :1], input_labels=labels[:1, :1])
        assert out.pred_masks.shape == (1, 1, 1, 4 * EMBED, 4 * EMBED)
        # points and boxes together, and a mask prompt
        mask_prompt = torch.randn(1, 1, 4 * EMBED, 4 * EMBED)
        out = model(
            pixel_values=_pixels(1),
            input_points=points[:1, :3],
            input_labels=labels[:1, :3],
            input_boxes=_boxes(1, 3),
            input_masks=mask_prompt,
        )
        assert out.pred_masks.shape == (1, 3, 1, 4 * EMBED, 4 * EMBED)


def test_per_prompt_mask_prompts(model: PASamModel) -> None:
    """Masks of shape (B, P, M, M) prompt each prompt separately: each prompt's output equals a run with that mask
    alone, and a mask-only batch of P masks gives P outputs."""
    model.eval()
    pixels = _pixels(1)
    masks = torch.randn(1, 3, 4 * EMBED, 4 * EMBED)
    boxes = _boxes(1, 3)
    with torch.no_grad():
        embeddings = model.get_image_embeddings(pixels)
        adapter = model.compute_adapter_pixel_values(pixels)
        common = {"image_embeddings": embeddings, "adapter_pixel_values": adapter}
        together = model(**common, input_boxes=boxes, input_masks=masks).pred_masks
        mask_only = model(**common, input_masks=masks).pred_masks
        assert together.shape == mask_only.shape == (1, 3, 1, 4 * EMBED, 4 * EMBED)
        for index in range(3):
            alone = model(**common, input_boxes=boxes[:, index : index + 1], input_masks=masks[:, index : index + 1])
            torch.testing.assert_close(together[:, index : index + 1], alone.pred_masks, atol=1e-5, rtol=1e-5)
            alone = model(**common, input_masks=masks[:, index : index + 1])
            torch.testing.assert_close(mask_only[:, index : index + 1], alone.pred_masks, atol=1e-5, rtol=1e-5)
        with pytest.raises(ValueError, match="masks per image but there are 2"):
            model(**common, input_boxes=_boxes(1, 2), input_masks=masks)
        with pytest.raises(ValueError, match="input_masks must have shape"):
            model(**common, input_masks=torch.zeros(1, 3, 8, 8))


def test_bfloat16_forward(model: PASamModel) -> None:
    model = model.to(torch.bfloat16)
    with torch.no_grad():
        out = model(pixel_values=_pixels().to(torch.bfloat16), input_boxes=_boxes())
    assert out.pred_masks.dtype == torch.bfloat16
    assert torch.isfinite(out.pred_masks.float()).all()


def test_clear_errors(model: PASamModel) -> None:
    embeddings = model.get_image_embeddings(_pixels())
    with pytest.raises(ValueError, match="adapter_pixel_values is required"):
        model(image_embeddings=embeddings, input_boxes=_boxes())
    with pytest.raises(ValueError, match="adapter_pixel_values must have shape"):
        model(pixel_values=_pixels(), input_boxes=_boxes(), adapter_pixel_values=torch.zeros(2, 3, 32, 32))
    with pytest.raises(ValueError, match="batch size"):
        model(pixel_values=_pixels(), input_boxes=_boxes(batch_size=3))
    with pytest.raises(ValueError, match="Either pixel_values or image_embeddings"):
        model(input_boxes=_boxes())


def test_image_embeddings_path_matches_pixel_path(model: PASamModel) -> None:
    pixels = _pixels()
    with torch.no_grad():
        embeddings = model.get_image_embeddings(pixels)
        assert embeddings.shape == (2, model.config.vision_config.output_channels, EMBED, EMBED)
        adapter = model.compute_adapter_pixel_values(pixels)
        from_pixels = model(pixel_values=pixels, input_boxes=_boxes())
        from_embeddings = model(image_embeddings=embeddings, adapter_pixel_values=adapter, input_boxes=_boxes())
    torch.testing.assert_close(from_pixels.pred_masks, from_embeddings.pred_masks, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------------- adapter semantics


def test_adapter_changes_output(model: PASamModel) -> None:
    sam = _sam_from(model)
    with torch.no_grad():
        pa = model(pixel_values=_pixels(), input_boxes=_boxes())
        plain = sam(pixel_values=_pixels(), input_boxes=_boxes(), multimask_output=False)
    # random init keeps logits tiny: compare the change to the logits' own scale
    assert (pa.pred_masks - plain.pred_masks).abs().max() > 0.05 * plain.pred_masks.abs().max()


def test_zeroed_adapter_reproduces_sam(model: PASamModel) -> None:
    model.zero_adapter_outputs_()
    sam = _sam_from(model)
    points = torch.rand(2, 3, 2, 2) * IMAGE_SIZE
    with torch.no_grad():
        for multimask in (False, True):
            pa = model(pixel_values=_pixels(), input_boxes=_boxes(), mine_points=False, multimask_output=multimask)
            plain = sam(pixel_values=_pixels(), input_boxes=_boxes(), multimask_output=multimask)
            torch.testing.assert_close(pa.pred_masks, plain.pred_masks, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(pa.iou_scores, plain.iou_scores, atol=1e-5, rtol=1e-5)
        pa = model(pixel_values=_pixels(), input_points=points, mine_points=False)
        plain = sam(pixel_values=_pixels(), input_points=points, multimask_output=False)
        torch.testing.assert_close(pa.pred_masks, plain.pred_masks, atol=1e-5, rtol=1e-5)


def test_eval_is_deterministic(model: PASamModel) -> None:
    with torch.no_grad():
        first = model(pixel_values=_pixels(), input_boxes=_boxes())
        second = model(pixel_values=_pixels(), input_boxes=_boxes())
    assert torch.equal(first.pred_masks, second.pred_masks)
    assert torch.equal(first.mined_point_coords, second.mined_point_coords)


def test_training_gumbel_gives_every_adapter_tensor_a_gradient(config: PASamConfig) -> None:
    torch.manual_seed(0)
    model = PASamModel(config).train()
    out = model(pixel_values=_pixels(), input_boxes=_boxes(), labels=(torch.rand(2, 3, 64, 64) > 0.5).long())
    k = config.mask_decoder_config.num_mined_points
    for b in range(2):
        for p in range(3):
            cells = (out.mined_point_coords[b, p] / (IMAGE_SIZE / EMBED) - 0.5).round().long()
            flat = (cells[:, 1] * EMBED + cells[:, 0]).tolist()
            assert len(set(flat[:k])) == k and len(set(flat[k:])) == k  # exactly k distinct cells per sign
    out.loss.backward()
    for name in model.adapter_state_dict_keys():
        param = model.get_parameter(name)
        assert param.grad is not None and param.grad.abs().sum() > 0, f"no gradient for {name}"


def test_point_mining_switch(config: PASamConfig) -> None:
    model = PASamModel(config).train()
    model.set_point_mining(False)
    out = model(pixel_values=_pixels(), input_boxes=_boxes())
    assert out.mined_point_coords is None
    model.set_point_mining(True)
    assert model(pixel_values=_pixels(), input_boxes=_boxes()).mined_point_coords is not None
    model.eval()
    model.set_point_mining(False)  # eval mode always mines, as released
    with torch.no_grad():
        assert model(pixel_values=_pixels(), input_boxes=_boxes()).mined_point_coords is not None


def test_gumbel_top_k_selects_k_distinct_cells_with_unit_weight() -> None:
    torch.manual_seed(0)
    scores = torch.randn(3, 5, 64, requires_grad=True)
    indices, weights = gumbel_top_k(scores, 4)
    assert indices.shape == weights.shape == (3, 5, 4)
    assert all(len(set(row.tolist())) == 4 for row in indices.reshape(-1, 4))
    assert torch.equal(weights.detach(), torch.ones_like(weights))
    weights.sum().backward()
    assert scores.grad.abs().sum() > 0


@pytest.mark.parametrize("adapter_kwargs", [{"consistency_module": "cross_attention"}, {"adapter_layer_index": 0}])
def test_adapter_options(adapter_kwargs: dict) -> None:
    torch.manual_seed(0)
    model = PASamModel(tiny_config(**adapter_kwargs)).train()
    out = model(pixel_values=_pixels(), input_boxes=_boxes(), labels=(torch.rand(2, 3, 64, 64) > 0.5).long())
    out.loss.backward()
    assert out.pred_masks.shape == (2, 3, 1, 4 * EMBED, 4 * EMBED)
    assert all(model.get_parameter(n).grad is not None for n in model.adapter_state_dict_keys())


# ------------------------------------------------------------------------- independent re-derivation of the spec


def _linear(x: torch.Tensor, layer: torch.nn.Linear) -> torch.Tensor:
    return x @ layer.weight.T + layer.bias


def _attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn, heads: int) -> torch.Tensor:
    """Multi-head attention written out from SAM's definition, for one token set: (n, C) x (m, C) -> (n, C)."""
    q, k, v = _linear(q, attn.q_proj), _linear(k, attn.k_proj), _linear(v, attn.v_proj)
    d = q.shape[-1] // heads
    out = []
    for h in range(heads):
        qh, kh, vh = q[:, h * d : (h + 1) * d], k[:, h * d : (h + 1) * d], v[:, h * d : (h + 1) * d]
        out.append(torch.softmax(qh @ kh.T / math.sqrt(d), dim=-1) @ vh)
    return _linear(torch.cat(out, dim=-1), attn.out_proj)


def _mlp(x: torch.Tensor, mlp) -> torch.Tensor:
    x = torch.relu(_linear(x, mlp.proj_in))
    x = torch.relu(_linear(x, mlp.layers[0]))
    return _linear(x, mlp.proj_out)


def _reference_adapter(adapter, queries, keys, query_pe, key_pe, g0, point_embed, heads, k, size):
    """Spec section 4 for one (image, prompt) token set, eval mode (plain top-k). Shapes: queries (T, C),
    keys/key_pe/g0 (N, C)."""
    gk = g0 * keys  # 1. guided gate
    a = _attention(queries + query_pe, gk + key_pe, gk, adapter.cross_attn_token_to_image, heads)  # 2.
    t0 = a[1]  # 3. first mask token (index 0 is the IoU token)
    u = _mlp(torch.cat([adapter.static_uncertain_token.weight[0], t0]), adapter.uncertain_mlp)
    r = _mlp(torch.cat([adapter.static_refined_token.weight[0], t0]), adapter.refined_mlp)
    coarse, refined, unc = gk @ t0, gk @ r, torch.sigmoid(gk @ u)  # 4.
    pa = torch.where(unc >= 0.5, refined, coarse)
    a = a.clone()
    a[1] = r  # 5.
    score = unc * (torch.sigmoid(refined) - torch.sigmoid(coarse))  # 6.
    pos, neg = torch.topk(score, k).indices, torch.topk(-score, k).indices
    content = (keys + gk)[torch.cat([pos, neg])]
    # the positional part is SAM's random-Fourier PE at the cell centre: exactly key_pe at that cell
    position = key_pe[torch.cat([pos, neg])] + torch.cat([point_embed[1].expand(k, -1), point_embed[0].expand(k, -1)])
    return {
        "attention_output": torch.cat([a, content]),
        "guided_keys": gk,
        "query_point_embedding": torch.cat([query_pe, position]),
        "coarse_masks": coarse.reshape(size),
        "refined_masks": refined.reshape(size),
        "uncertainty_maps": unc.reshape(size),
        "pa_masks": pa.reshape(size),
        "mined": (set(pos.tolist()), set(neg.tolist())),
    }


def test_adapter_matches_spec_rederivation(model: PASamModel) -> None:
    adapter = model.mask_decoder.prompt_adapter
    config = model.config.mask_decoder_config
    g = torch.Generator().manual_seed(3)
    batch, prompts, tokens, channels, n = 2, 3, 7, config.hidden_size, EMBED * EMBED
    queries = torch.randn(batch, prompts, tokens, channels, generator=g)
    query_pe = torch.randn(batch, prompts, tokens, channels, generator=g)
    keys = torch.randn(batch, prompts, n, channels, generator=g)
    key_pe = model.get_image_wide_positional_embeddings().flatten(2).transpose(1, 2)  # (1, N, C)
    key_pe = key_pe.unsqueeze(1).expand(batch, prompts, n, channels)
    g0 = torch.randn(batch, 1, n, channels, generator=g)
    point_embed = torch.cat([model.prompt_encoder.point_embed[0].weight, model.prompt_encoder.point_embed[1].weight])
    with torch.no_grad():
        out = adapter(
            queries=queries,
            keys=keys,
            query_point_embedding=query_pe,
            key_point_embedding=key_pe,
            guiding_embedding=g0,
            point_label_embeddings=point_embed,
            mine_points=True,
            embedding_size=(EMBED, EMBED),
        )
        k = config.num_mined_points
        for b in range(batch):
            for p in range(prompts):
                ref = _reference_adapter(
                    adapter, queries[b, p], keys[b, p], query_pe[b, p], key_pe[b, p], g0[b, 0],
                    point_embed, config.num_attention_heads, k, (1, EMBED, EMBED),
                )
                mined = out.mined_indices[b, p].tolist()
                assert (set(mined[:k]), set(mined[k:])) == ref["mined"]
                for name in ("guided_keys", "coarse_masks", "refined_masks", "uncertainty_maps", "pa_masks"):
                    torch.testing.assert_close(getattr(out, name)[b, p], ref[name], atol=1e-5, rtol=1e-5)
                # The appended point tokens may come in another order within each sign (attention does not care):
                # put both in cell order before comparing.
                ref_cells = torch.cat(
                    [torch.topk(_score(ref), k).indices, torch.topk(-_score(ref), k).indices]
                ).tolist()
                ours_order = _cell_order(mined, k)
                ref_order = _cell_order(ref_cells, k)
                for name in ("attention_output", "query_point_embedding"):
                    ours, theirs = getattr(out, name)[b, p], ref[name]
                    torch.testing.assert_close(ours[:tokens], theirs[:tokens], atol=1e-5, rtol=1e-5)
                    torch.testing.assert_close(
                        ours[tokens:][ours_order], theirs[tokens:][ref_order], atol=1e-5, rtol=1e-5
                    )


def _score(ref: dict) -> torch.Tensor:
    unc, refined, coarse = (ref[n].flatten() for n in ("uncertainty_maps", "refined_masks", "coarse_masks"))
    return unc * (torch.sigmoid(refined) - torch.sigmoid(coarse))


def _cell_order(cells: list[int], k: int) -> torch.Tensor:
    """Permutation sorting the positive and the negative halves of a mined-token list by cell index."""
    return torch.tensor(sorted(range(k), key=cells.__getitem__) + sorted(range(k, 2 * k), key=cells.__getitem__))


def _official_edges_numpy(pixel_values: torch.Tensor) -> np.ndarray:
    """Spec section 2, written with numpy/OpenCV only: bilinear to 256, HWC, trunc toward zero, wrap mod 256."""
    small = torch.nn.functional.interpolate(pixel_values, (256, 256), mode="bilinear", align_corners=False)
    hwc = small[0].permute(1, 2, 0).numpy()
    wrapped = np.mod(np.trunc(hwc).astype(np.int64), 256).astype(np.uint8)
    return cv2.Canny(wrapped, 10, 100).astype(np.float32) / 255.0


def test_official_edge_map_on_real_photo(shared_data) -> None:
    from PIL import Image

    photo = Image.open(shared_data / "davis345" / "images" / "000.jpg").convert("RGB")
    processor = PASamProcessor.from_model_config(PASamConfig())  # the release's 1024 / 256 geometry
    inputs = processor(images=photo, return_tensors="pt")
    expected = _official_edges_numpy(inputs["pixel_values"])
    adapter = inputs["adapter_pixel_values"]
    assert adapter.shape == (1, 4, 256, 256)
    np.testing.assert_array_equal(adapter[0, 3].numpy(), expected)
    assert 0.01 < expected.mean() < 0.5  # the odd cast leaves a handful of grey levels that do produce edges
    small = torch.nn.functional.interpolate(inputs["pixel_values"], (256, 256), mode="bilinear", align_corners=False)
    torch.testing.assert_close(adapter[:, :3], small)
    if platform.machine() in ("x86_64", "AMD64"):
        # On x86 numpy's own cast wraps the same way; the processor must not depend on it, but must agree with it.
        hwc = small[0].permute(1, 2, 0).numpy()
        with np.errstate(invalid="ignore"):
            np.testing.assert_array_equal(
                cv2.Canny(hwc.astype(np.uint8), 10, 100).astype(np.float32) / 255.0, expected
            )


# ------------------------------------------------------------------------------ transformers' SAM-style checks


def test_sdpa_matches_eager() -> None:
    torch.manual_seed(0)
    state = PASamModel(tiny_config()).state_dict()
    config_eager = tiny_config()
    config_eager._attn_implementation = "eager"
    config_sdpa = tiny_config()
    config_sdpa._attn_implementation = "sdpa"
    models = []
    for config in (config_eager, config_sdpa):
        m = PASamModel(config).eval()
        m.load_state_dict(state)
        models.append(m)
    assert models[0].mask_decoder.config._attn_implementation == "eager"
    assert models[1].mask_decoder.config._attn_implementation == "sdpa"
    with torch.no_grad():
        outs = [m(pixel_values=_pixels(), input_boxes=_boxes()) for m in models]
    torch.testing.assert_close(outs[0].pred_masks, outs[1].pred_masks, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(outs[0].pa_masks, outs[1].pa_masks, atol=1e-4, rtol=1e-4)


def test_attentions_and_hidden_states(config: PASamConfig) -> None:
    config._attn_implementation = "eager"
    model = PASamModel(config).eval()
    with torch.no_grad():
        out = model(pixel_values=_pixels(), input_boxes=_boxes(), output_attentions=True, output_hidden_states=True)
    layers = config.vision_config.num_hidden_layers
    assert len(out.vision_hidden_states) == layers + 1 or len(out.vision_hidden_states) == layers
    assert len(out.vision_attentions) == layers
    assert out.mask_decoder_attentions is not None
    assert len(out.mask_decoder_attentions) == config.mask_decoder_config.num_hidden_layers


def test_labels_give_a_loss_and_require_single_mask(model: PASamModel) -> None:
    labels = (torch.rand(2, 3, 64, 64) > 0.5).long()
    out = model(pixel_values=_pixels(), input_boxes=_boxes(), labels=labels)
    assert out.loss.ndim == 0 and torch.isfinite(out.loss)
    with pytest.raises(ValueError, match="multimask_output=False"):
        model(pixel_values=_pixels(), input_boxes=_boxes(), labels=labels, multimask_output=True)


def _reference_gumbel_top_k(scores: torch.Tensor, noise: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Spec section 4.6, training: one Gumbel sample, k softmax rounds each followed by adding log(max(1 - p, tiny)),
    hard top-k of the summed softmaxes, straight-through weight `hard - g.detach() + g`."""
    logits = scores + noise
    total = torch.zeros_like(scores)
    for _ in range(k):
        p = torch.softmax(logits, dim=-1)
        total = total + p
        logits = logits + torch.log(torch.clamp(1 - p, min=torch.finfo(scores.dtype).tiny))
    cells = total.topk(k).indices
    hard = torch.zeros_like(total).scatter(-1, cells, 1.0)
    weights = (hard - total.detach() + total)[cells]
    return cells, weights


def test_adapter_training_gradients_match_spec_rederivation(model: PASamModel) -> None:
    """Training mode (Gumbel top-k, straight-through weights on the cell's content and positional encoding, the label
    embedding added after, unweighted: reference 4.6 as corrected): the gradients of every adapter tensor equal
    those of the spec written out by hand."""
    adapter = model.mask_decoder.prompt_adapter.train()
    config = model.config.mask_decoder_config
    g = torch.Generator().manual_seed(5)
    tokens, channels, n, k = 7, config.hidden_size, EMBED * EMBED, config.num_mined_points
    queries = torch.randn(1, 1, tokens, channels, generator=g)
    query_pe = torch.randn(1, 1, tokens, channels, generator=g)
    keys = torch.randn(1, 1, n, channels, generator=g)
    key_pe = model.get_image_wide_positional_embeddings().flatten(2).transpose(1, 2).unsqueeze(1).detach()
    g0 = torch.randn(1, 1, n, channels, generator=g)
    point_embed = torch.cat(
        [model.prompt_encoder.point_embed[0].weight, model.prompt_encoder.point_embed[1].weight]
    ).detach()
    probe_a = torch.randn(1, 1, tokens + 2 * k, channels, generator=g)
    probe_pe = torch.randn(1, 1, tokens + 2 * k, channels, generator=g)
    parameters = [p for p in adapter.parameters() if p.requires_grad]

    torch.manual_seed(11)
    out = adapter(
        queries=queries, keys=keys, query_point_embedding=query_pe, key_point_embedding=key_pe,
        guiding_embedding=g0, point_label_embeddings=point_embed, mine_points=True, embedding_size=(EMBED, EMBED),
    )
    ours = torch.autograd.grad(
        (out.attention_output * probe_a).sum() + (out.query_point_embedding * probe_pe).sum(), parameters
    )

    # The module draws its Gumbel noise as -log(Exponential(1)), positives first: draw the same two samples.
    torch.manual_seed(11)
    noise_pos = -torch.empty(n).exponential_().log()
    noise_neg = -torch.empty(n).exponential_().log()
    q, kk, qpe, kpe, gg = queries[0, 0], keys[0, 0], query_pe[0, 0], key_pe[0, 0], g0[0, 0]
    gk = gg * kk
    a = _attention(q + qpe, gk + kpe, gk, adapter.cross_attn_token_to_image, config.num_attention_heads)
    t0 = a[1]
    u = _mlp(torch.cat([adapter.static_uncertain_token.weight[0], t0]), adapter.uncertain_mlp)
    r = _mlp(torch.cat([adapter.static_refined_token.weight[0], t0]), adapter.refined_mlp)
    coarse, refined, unc = gk @ t0, gk @ r, torch.sigmoid(gk @ u)
    a = torch.cat([a[:1], r[None], a[2:]])
    score = unc * (torch.sigmoid(refined) - torch.sigmoid(coarse))
    pos, w_pos = _reference_gumbel_top_k(score, noise_pos, k)
    neg, w_neg = _reference_gumbel_top_k(-score, noise_neg, k)
    cells, weights = torch.cat([pos, neg]), torch.cat([w_pos, w_neg])[:, None]
    labels = torch.cat([point_embed[1].expand(k, -1), point_embed[0].expand(k, -1)])
    content = (kk + gk)[cells] * weights
    position = kpe[cells] * weights + labels
    ref_a, ref_pe = torch.cat([a, content]), torch.cat([qpe, position])
    theirs = torch.autograd.grad((ref_a * probe_a[0, 0]).sum() + (ref_pe * probe_pe[0, 0]).sum(), parameters)

    assert out.mined_indices[0, 0].tolist() == cells.tolist()
    for parameter_grad, reference_grad in zip(ours, theirs):
        torch.testing.assert_close(parameter_grad, reference_grad, atol=1e-5, rtol=1e-4)
