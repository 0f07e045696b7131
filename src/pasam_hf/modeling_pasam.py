"""PyTorch PA-SAM: SAM with a prompt adapter in the mask decoder (Xie et al., ICME 2024, arXiv 2401.13051).

Only what differs from transformers' SAM is written here: the guiding branch, the prompt adapter, the two-way
block that hosts it, the decoder forward that threads the adapter through, and the model forward that feeds it.
SAM's parameter names are untouched, so SAM checkpoints load with only the adapter keys missing.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers.models.sam.configuration_sam import SamConfig
from transformers.models.sam.modeling_sam import (
    SamAttention,
    SamFeedForward,
    SamImageSegmentationOutput,
    SamLayerNorm,
    SamMaskDecoder,
    SamModel,
    SamPositionalEmbedding,
    SamPreTrainedModel,
    SamPromptEncoder,
    SamTwoWayAttentionBlock,
    SamTwoWayTransformer,
    SamVisionEncoder,
)
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, local_torch_dtype
from transformers.models.sam.modeling_sam import eager_attention_forward
from transformers.processing_utils import Unpack
from transformers.utils import ModelOutput, logging
from transformers.utils.generic import TransformersKwargs, merge_with_config_defaults
from transformers.utils.output_capturing import capture_outputs

from .configuration_pasam import PASamConfig, PASamMaskDecoderConfig
from .image_processing_pasam import compute_adapter_pixel_values
from .losses import pasam_loss

logger = logging.get_logger(__name__)

# Index of the first mask token among the output tokens (index 0 is the IoU token).
MASK_TOKEN_0 = 1


@dataclass
class PASamPromptAdapterOutput(ModelOutput):
    r"""
    Output of [`PASamPromptAdapter`]. `B` images, `P` prompts per image, `T` tokens, `N = h * w` image cells.

    attention_output (`torch.Tensor` of shape `(B, P, T + 2k, C)`):
        The adapter's token update `A`: its token-to-image attention output with the first mask token replaced by
        the refined token, followed by the `2k` mined point tokens (content part, `k` positive then `k` negative).
    guided_keys (`torch.Tensor` of shape `(B, P, N, C)`):
        `Gk`, the guided image embedding, added to the block's keys.
    query_point_embedding (`torch.Tensor` of shape `(B, P, T + 2k, C)`):
        The query positional embedding extended with the mined points' positional part.
    coarse_masks, refined_masks (`torch.Tensor` of shape `(B, P, 1, h, w)`):
        Logits `C = t0 . Gk` and `R = r . Gk`.
    uncertainty_maps (`torch.Tensor` of shape `(B, P, 1, h, w)`):
        `U = sigmoid(u . Gk)`.
    pa_masks (`torch.Tensor` of shape `(B, P, 1, h, w)`):
        `where(U >= 0.5, R, C)`.
    mined_indices (`torch.LongTensor` of shape `(B, P, 2k)`), mined_labels (`torch.LongTensor` of shape `(B, P, 2k)`):
        Flat cell indices of the mined points and their labels (1 positive, 0 negative); `None` when mining is off.
    """

    attention_output: Tensor | None = None
    guided_keys: Tensor | None = None
    query_point_embedding: Tensor | None = None
    coarse_masks: Tensor | None = None
    refined_masks: Tensor | None = None
    uncertainty_maps: Tensor | None = None
    pa_masks: Tensor | None = None
    mined_indices: Tensor | None = None
    mined_labels: Tensor | None = None


@dataclass
class PASamMaskDecoderOutput(ModelOutput):
    r"""
    masks (`torch.Tensor` of shape `(B, P, num_masks, 4h, 4w)`): SAM's low resolution mask logits.
    iou_scores (`torch.Tensor` of shape `(B, P, num_masks)`): predicted mask IoUs.
    adapter_output ([`PASamPromptAdapterOutput`]): the adapter's intermediate results.
    """

    masks: Tensor | None = None
    iou_scores: Tensor | None = None
    adapter_output: PASamPromptAdapterOutput | None = None


@dataclass
class PASamImageSegmentationOutput(SamImageSegmentationOutput):
    r"""
    [`SamImageSegmentationOutput`] plus PA-SAM's intermediate results. `B` images, `P` prompts per image.

    iou_scores (`torch.Tensor` of shape `(B, P, num_masks)`):
        Predicted IoU of each mask.
    pred_masks (`torch.Tensor` of shape `(B, P, num_masks, 256, 256)`):
        Low resolution mask logits; post-process with `PASamProcessor.post_process_masks`.
    loss (`torch.Tensor` of shape `()`, *optional*, returned when `labels` is given):
        The PA-SAM training loss (see `pasam_hf.losses.pasam_loss`).
    coarse_masks, refined_masks (`torch.Tensor` of shape `(B, P, 1, 64, 64)`):
        The adapter's coarse (`C`) and refined (`R`) mask logits.
    uncertainty_maps (`torch.Tensor` of shape `(B, P, 1, 64, 64)`):
        The uncertainty map `U` in [0, 1].
    pa_masks (`torch.Tensor` of shape `(B, P, 1, 64, 64)`):
        `where(U >= 0.5, R, C)`.
    mined_point_coords (`torch.Tensor` of shape `(B, P, 2k, 2)`, *optional*):
        (x, y) of the mined points in the model's input frame (the 1024 x 1024 padded image), `k` positive then
        `k` negative; `None` when point mining did not run.
    mined_point_labels (`torch.LongTensor` of shape `(B, P, 2k)`, *optional*):
        1 for positive, 0 for negative mined points.
    """

    loss: Tensor | None = None
    coarse_masks: Tensor | None = None
    refined_masks: Tensor | None = None
    uncertainty_maps: Tensor | None = None
    pa_masks: Tensor | None = None
    mined_point_coords: Tensor | None = None
    mined_point_labels: Tensor | None = None


def gumbel_top_k(scores: Tensor, k: int, tau: float = 1.0) -> tuple[Tensor, Tensor]:
    """Differentiable top-k over the last dimension (Gumbel top-k relaxation, PA-SAM eq. 4-6).

    One Gumbel(0, 1) sample is added to the scores, then `k` rounds of softmax each remove the mass already taken
    (`log(max(1 - p, tiny))`). The `k` softmaxes sum to `g`; the hard choice is top-k of `g` and its weight is the
    straight-through `hard - g.detach() + g`, which is exactly 1 in value at the chosen cells.

    Args:
        scores (`torch.Tensor` of shape `(..., n)`): selection scores.

    Returns:
        `(indices, weights)`, both of shape `(..., k)`: the chosen cells and their straight-through weights.
    """
    tiny = torch.finfo(scores.dtype).tiny
    # -log(Exponential(1)) is a Gumbel(0, 1) sample; this is how torch.nn.functional.gumbel_softmax draws it.
    logits = scores - torch.empty_like(scores).exponential_().log()
    soft = torch.zeros_like(scores)
    total = torch.zeros_like(scores)
    for _ in range(k):
        logits = logits + torch.log(torch.clamp(1.0 - soft, min=tiny))
        soft = torch.softmax(logits / tau, dim=-1)
        total = total + soft
    indices = total.topk(k, dim=-1).indices
    chosen = total.gather(-1, indices)
    return indices, 1.0 + (chosen - chosen.detach())


def _static_size(size: int | torch.SymInt, nominal: int) -> int:
    """`size` when it is a Python int; `nominal` for a symbolic size, so that no decision guards on it."""
    return size if isinstance(size, int) else nominal


def block_conv(conv: nn.Conv2d, blocks: Tensor) -> Tensor:
    """A convolution whose kernel equals its stride (no padding) on pixel blocks laid out as features.

    Args:
        conv (`nn.Conv2d`): kernel `(k_h, k_w)` = stride, no padding, no groups, no dilation.
        blocks (`torch.Tensor` of shape `(..., k_h * k_w * C_in)`): each output pixel's input block, ordered
            (block row, block column, channel).

    Returns:
        `torch.Tensor` of shape `(..., C_out)`: `conv` at that pixel (up to float rounding).
    """
    return F.linear(blocks, conv.weight.permute(0, 2, 3, 1).reshape(conv.out_channels, -1), conv.bias)


def pixelwise_transposed_conv(conv: nn.ConvTranspose2d, pixels: Tensor) -> Tensor:
    """A transposed convolution whose kernel equals its stride (no padding), as one product over the pixels.

    Each input pixel maps to its own `k_h x k_w` block of output pixels, so the output is kept as blocks: no
    scattering into an image, which the per-pixel layer norm, GELU and the next such convolution do not need.

    Args:
        conv (`nn.ConvTranspose2d`): kernel `(k_h, k_w)` = stride, no padding, no groups, no dilation.
        pixels (`torch.Tensor` of shape `(..., M, C_in)`).

    Returns:
        `torch.Tensor` of shape `(..., M * k_h * k_w, C_out)`, ordered (input pixel, block row, block column): `conv`'s
        output pixels (up to float rounding).
    """
    kernel_h, kernel_w = conv.kernel_size
    weight = conv.weight.permute(2, 3, 1, 0).reshape(kernel_h * kernel_w * conv.out_channels, conv.in_channels)
    bias = None if conv.bias is None else conv.bias.repeat(kernel_h * kernel_w)
    return F.linear(pixels, weight, bias).unflatten(-1, (kernel_h * kernel_w, conv.out_channels)).flatten(-3, -2)


def _check_patch_conv(conv: nn.Conv2d | nn.ConvTranspose2d) -> None:
    """What `PASamMaskDecoder`'s pixel products assume of its convolutions (square kernels: they read one side)."""
    if (
        tuple(conv.kernel_size) != tuple(conv.stride)
        or conv.kernel_size[0] != conv.kernel_size[1]
        or any(conv.padding)
        or conv.groups != 1
        or any(d != 1 for d in conv.dilation)
    ):
        raise ValueError(
            f"{conv} must have a square kernel = stride, no padding, groups or dilation (SAM's layout)."
        )


def _fold_shared_position(states: Tensor, position: Tensor | None) -> tuple[Tensor, Tensor | None]:
    """`(states + position, None)` when `states` is shared by the prompts (one sum per image), else unchanged: a
    per-prompt side keeps its position apart, for a second product instead of a per-prompt sum."""
    if position is not None and states.shape[1] == 1:
        return states + position, None
    return states, position


class PASamAttention(SamAttention):
    """[`SamAttention`] whose query or key/value side may be shared by all prompts of an image, and which skips the
    projection of the image side when the token side is small.

    Inputs are `(B, P, n, C)` or `(B, 1, n, C)`. Each projection runs on what it is given, so image-side inputs
    that are the same for every prompt (the image tokens before the first two-way block has updated them) are
    projected once per image instead of once per prompt; only the projected tensors are broadcast to the `P`
    prompts.

    The decoder's attentions pair a few tokens (`T`, 7 for a box) with the `N = 4096` image tokens. Projecting the
    image side costs `N * C * D` per prompt and projection; when `heads * T` is well below the internal width `D`
    it is cheaper to move the projection onto the tokens instead, since both the scores and the weighted sum are
    linear in the image tokens (see [`factored_token_queries`], [`factored_token_keys`]). Which form runs is
    decided from the shapes alone (no data-dependent branching), by a multiply-accumulate count; both give the
    same result up to float rounding (tested). With an `attention_similarity` the configured attention interface
    always runs, as in [`SamAttention`].
    """

    # A factored form runs when its multiply-accumulate count is at most this fraction of SAM's form (it runs a
    # few more, smaller kernels). 0 always runs SAM's form, math.inf always the cheaper factored one (tests).
    factored_form_threshold: float = 0.8

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        attention_similarity: Tensor | None = None,
        query_position: Tensor | None = None,
        key_position: Tensor | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> tuple[Tensor, Tensor | None]:
        r"""
        Args:
            query (`torch.Tensor` of shape `(B, P or 1, n_q, C)`), key and value (`(B, P or 1, n_k, C)`).
            query_position, key_position (`torch.Tensor`, *optional*): positional embeddings added to the query and
                to the key (not the value), broadcastable to them; given apart so a factored form can apply a shared
                `(B, 1, N, C)` one without materialising the per-prompt sum.

        Returns:
            `(attn_output (B, P, n_q, C), attn_weights or None)`.
        """
        if attention_similarity is None:
            form = self._cheapest_form(query.shape, key.shape, query_position is not None, key_position is not None)
            if form == "token_queries":
                return self.factored_token_queries(query, key, value, query_position, key_position), None
            if form == "token_keys":
                return self.factored_token_keys(query, key, value, query_position, key_position), None

        query = self._project(self.q_proj, query, query_position)
        key = self._project(self.k_proj, key, key_position)
        value = self.v_proj(value)

        batch_size = query.shape[0]
        point_batch_size = max(query.shape[1], key.shape[1])
        query = self._separate_heads(query.expand(batch_size, point_batch_size, -1, -1), self.num_attention_heads)
        key = self._separate_heads(key.expand(batch_size, point_batch_size, -1, -1), self.num_attention_heads)
        value = self._separate_heads(value.expand(batch_size, point_batch_size, -1, -1), self.num_attention_heads)

        attention_interface = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward
        )
        attn_output, attn_weights = attention_interface(
            self,
            query,
            key,
            value,
            attention_mask=attention_similarity,
            dropout=0.0,
            scaling=self.scaling,
            is_causal=self.is_causal,
            **kwargs,
        )
        attn_output = self._recombine_heads(attn_output, point_batch_size)
        return self.out_proj(attn_output), attn_weights

    @staticmethod
    def _project(projection: nn.Linear, states: Tensor, position: Tensor | None) -> Tensor:
        """`projection(states + position)`. A position shared by the prompts (`(B, 1, n, C)` against per-prompt
        states) is projected once and added at the projected width: no per-prompt sum at width `C` is made."""
        if position is None:
            return projection(states)
        if position.shape[1] == 1 < states.shape[1]:
            projected = projection(states)
            projected += F.linear(position, projection.weight)
            return projected
        return projection(states + position)

    def _cheapest_form(
        self, query_shape: torch.Size, key_shape: torch.Size, query_position: bool = False, key_position: bool = False
    ) -> str:
        """`"projected"` (SAM's form), `"token_queries"` or `"token_keys"`: the one with the fewest
        multiply-accumulates for these shapes (`(B, P or 1, n, C)` each; the value has the key's shape), given
        whether a query and a key position come with them.

        A symbolic size (a dynamic dimension under `torch.export` or `torch.compile`) counts at a nominal value
        instead: comparing it would put a guard on that dimension, and an ONNX export with a dynamic prompt count
        would fail. Every form is exact, so a nominal count can only cost speed.
        """
        query_prompts, num_queries = _static_size(query_shape[1], 16), _static_size(query_shape[2], 8)
        key_prompts, num_keys = _static_size(key_shape[1], 16), _static_size(key_shape[2], 8)
        hidden = query_shape[3]
        prompts, width, heads = max(query_prompts, key_prompts), self.internal_dim, self.num_attention_heads
        projected = (
            query_prompts * num_queries * hidden * width  # q_proj
            + 2 * key_prompts * num_keys * hidden * width  # k_proj, v_proj
            + 2 * prompts * num_queries * num_keys * width  # scores and weighted sum
            + prompts * num_queries * width * hidden  # out_proj
        )
        # Scores and weighted sum, per head at width C; a per-prompt side's position is one more product.
        attention = prompts * num_queries * heads * num_keys * hidden
        token_queries = (
            query_prompts * num_queries * hidden * width  # q_proj
            + 2 * prompts * num_queries * width * hidden  # queries into key space; weighted sums out of value space
            + (3 if key_position and key_prompts > 1 else 2) * attention
            + prompts * num_queries * width * hidden  # out_proj
        )
        token_keys = (
            2 * key_prompts * num_keys * hidden * width  # k_proj, v_proj
            + 2 * prompts * num_keys * width * hidden  # keys into query space, values through out_proj
            + (3 if query_position and query_prompts > 1 else 2) * attention
        )
        best = min(token_queries, token_keys)
        if best > self.factored_form_threshold * projected:
            return "projected"
        return "token_queries" if token_queries <= token_keys else "token_keys"

    def _head_weights(self, projection: nn.Linear) -> Tensor:
        """`projection.weight` `(D, C)` as `(heads, D / heads, C)`."""
        return projection.weight.view(self.num_attention_heads, -1, projection.weight.shape[-1])

    def factored_token_queries(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        query_position: Tensor | None = None,
        key_position: Tensor | None = None,
    ) -> Tensor:
        r"""Few queries (tokens) attending to many keys (image tokens), without projecting the keys or values.

        For head `h`, `q_h . (W_k,h x + b_k,h) = (W_k,h^T q_h) . x + q_h . b_k,h` (the second term is the same for
        every key). The weights sum to one, so `sum_n a_n (W_v,h x_n + b_v,h)` is
        `W_v,h (sum_n a_n x_n) + b_v,h`. Scores and sums run at width `C` for each of the `heads * T` query rows.

        Args:
            query (`torch.Tensor` of shape `(B, P or 1, T, C)`), key and value (`(B, P or 1, N, C)`), positions as
                in `forward`: a per-prompt key takes its position as a second product (no `(B, P, N, C)` sum), a
                shared one as one sum per image.

        Returns:
            `torch.Tensor` of shape `(B, P, T, C)`: what SAM's form returns, up to float rounding.
        """
        heads = self.num_attention_heads
        if query_position is not None:
            query = query + query_position
        key, key_position = _fold_shared_position(key, key_position)
        projected = self.q_proj(query) * self.scaling
        num_queries = projected.shape[2]
        projected = projected.unflatten(-1, (heads, -1))  # (B, P, T, heads, d)
        in_key_space = torch.einsum("bpthd,hdc->bpthc", projected, self._head_weights(self.k_proj)).flatten(2, 3)
        # q_h . b_k,h is the same for every key and cancels in the softmax; it is kept (a broadcast add on the
        # scores) so that b_k stays in the graph with SAM's gradient: an unused parameter would stop DDP.
        bias = torch.einsum("bpthd,hd->bpth", projected, self.k_proj.bias.view(heads, -1)).flatten(2, 3)
        scores = in_key_space @ key.transpose(-1, -2) + bias.unsqueeze(-1)  # (B, P, T * heads, N)
        if key_position is not None:
            scores = scores + in_key_space @ key_position.transpose(-1, -2)
        weights = torch.softmax(scores, dim=-1)
        summed = (weights @ value).unflatten(2, (num_queries, heads))  # (B, P, T, heads, C)
        heads_out = torch.einsum("bpthc,hdc->bpthd", summed, self._head_weights(self.v_proj))
        heads_out = heads_out + self.v_proj.bias.view(heads, -1)
        return self.out_proj(heads_out.flatten(-2))

    def factored_token_keys(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        query_position: Tensor | None = None,
        key_position: Tensor | None = None,
    ) -> Tensor:
        r"""Many queries (image tokens) attending to few keys (tokens), without projecting the queries.

        For head `h`, `(W_q,h x + b_q,h) . k_h = x . (W_q,h^T k_h) + b_q,h . k_h` (the second term differs per key,
        so it is kept), and `out_proj` of the heads' weighted sums is `sum_h sum_t a_h,t (W_o,h v_h,t) + b_o`: the
        values are taken through `out_proj` before the sum, one `(heads * T, C)` matrix per prompt.

        Args:
            query (`torch.Tensor` of shape `(B, P or 1, N, C)`), key and value (`(B, P or 1, T, C)`), positions as
                in `forward`: a per-prompt query takes its position as a second product (no `(B, P, N, C)` sum), a
                shared one as one sum per image.

        Returns:
            `torch.Tensor` of shape `(B, P, N, C)`: what SAM's form returns, up to float rounding.
        """
        heads = self.num_attention_heads
        if key_position is not None:
            key = key + key_position
        query, query_position = _fold_shared_position(query, query_position)
        keys = (self.k_proj(key) * self.scaling).unflatten(-1, (heads, -1))  # (B, P, T, heads, d)
        values = self.v_proj(value).unflatten(-1, (heads, -1))
        num_keys = keys.shape[2]
        in_query_space = torch.einsum("bpthd,hdc->bphtc", keys, self._head_weights(self.q_proj)).flatten(2, 3)
        bias = torch.einsum("bpthd,hd->bpht", keys, self.q_proj.bias.view(heads, -1)).flatten(2, 3)
        # Scores as (B, P, heads * T, N): the softmax over each head's T keys then runs along N-long rows of a
        # strided view, about 10x faster on a CPU than over T-long contiguous rows.
        scores = in_query_space @ query.transpose(-1, -2) + bias.unsqueeze(-1)
        if query_position is not None:
            scores = scores + in_query_space @ query_position.transpose(-1, -2)
        weights = torch.softmax(scores.unflatten(2, (heads, num_keys)), dim=3).flatten(2, 3)
        out_weight = self.out_proj.weight.view(self.out_proj.weight.shape[0], heads, -1)  # (C, heads, d)
        through_out = torch.einsum("bpthd,chd->bphtc", values, out_weight).flatten(2, 3)  # (B, P, heads * T, C)
        return weights.transpose(-1, -2) @ through_out + self.out_proj.bias


class PASamPromptAdapter(nn.Module):
    """The prompt adapter: dense prompt compensation, uncertainty-guided token refinement and hard point mining.

    Runs inside one two-way block of the mask decoder, vectorised over images and prompts.
    """

    def __init__(self, config: PASamMaskDecoderConfig):
        super().__init__()
        hidden_size = config.hidden_size
        self.num_mined_points = config.num_mined_points
        self.gumbel_tau = config.gumbel_tau
        self.consistency_module = config.consistency_module
        self.static_uncertain_token = nn.Embedding(1, hidden_size)
        self.static_refined_token = nn.Embedding(1, hidden_size)
        self.uncertain_mlp = SamFeedForward(2 * hidden_size, hidden_size // 4, hidden_size, 3)
        self.refined_mlp = SamFeedForward(2 * hidden_size, hidden_size // 4, hidden_size, 3)
        self.cross_attn_token_to_image = PASamAttention(config, downsample_rate=config.attention_downsample_rate)
        if config.consistency_module == "cross_attention":
            self.consistency_attn = PASamAttention(config, downsample_rate=config.attention_downsample_rate)

    def guide(self, guiding_embedding: Tensor, keys: Tensor, key_point_embedding: Tensor) -> Tensor:
        """Consistency module: combine the guiding embedding `G0` `(B, 1, N, C)` with the keys `(B, P, N, C)`."""
        if self.consistency_module == "guided_gate":
            return guiding_embedding * keys
        # The paper's ablation: image tokens attend to the guiding embedding.
        guiding = guiding_embedding.expand_as(keys)
        attn_out, _ = self.consistency_attn(
            query=keys + key_point_embedding, key=guiding + key_point_embedding, value=guiding
        )
        return keys + attn_out

    def forward(
        self,
        queries: Tensor,
        keys: Tensor,
        query_point_embedding: Tensor,
        key_point_embedding: Tensor,
        guiding_embedding: Tensor,
        point_label_embeddings: Tensor,
        mine_points: bool,
        embedding_size: tuple[int, int],
    ) -> PASamPromptAdapterOutput:
        r"""
        Args:
            queries (`torch.Tensor` of shape `(B, P, T, C)`): the block's tokens after `layer_norm1`.
            keys (`torch.Tensor` of shape `(B, P, N, C)` or `(B, 1, N, C)`): the image tokens entering the block.
            query_point_embedding (`torch.Tensor` of shape `(B, P, T, C)`): the tokens' positional embedding.
            key_point_embedding (`torch.Tensor` of shape `(B, 1, N, C)`): the image positional embedding.
            guiding_embedding (`torch.Tensor` of shape `(B, 1, N, C)`): `G0` from the guiding branch.
            point_label_embeddings (`torch.Tensor` of shape `(2, C)`): the prompt encoder's negative and positive
                point embeddings (`point_embed[0]`, `point_embed[1]`).
            mine_points (`bool`): whether to mine hard points.
            embedding_size (`tuple[int, int]`): `(h, w)` of the image embedding, `N = h * w`.
        """
        batch_size, point_batch_size = queries.shape[:2]
        height, width = embedding_size
        guided_keys = self.guide(guiding_embedding, keys, key_point_embedding)

        attn_out, _ = self.cross_attn_token_to_image(
            query=queries + query_point_embedding, key=guided_keys, value=guided_keys, key_position=key_point_embedding
        )
        first_mask_token = attn_out[:, :, MASK_TOKEN_0]
        uncertain_token = self.uncertain_mlp(
            torch.cat([self.static_uncertain_token.weight.expand_as(first_mask_token), first_mask_token], dim=-1)
        )
        refined_token = self.refined_mlp(
            torch.cat([self.static_refined_token.weight.expand_as(first_mask_token), first_mask_token], dim=-1)
        )

        # The three maps in one batched matmul: guided_keys, the largest tensor here, is read once.
        projected = torch.stack([first_mask_token, refined_token, uncertain_token], dim=2) @ guided_keys.transpose(
            -1, -2
        )
        coarse, refined, uncertainty = projected.unbind(dim=2)
        uncertainty = torch.sigmoid(uncertainty)
        # The selection itself carries no gradient; each branch gets gradient only where it is selected.
        pa_mask = torch.where(uncertainty.detach() >= 0.5, refined, coarse)

        attn_out = torch.cat(
            [attn_out[:, :, :MASK_TOKEN_0], refined_token.unsqueeze(2), attn_out[:, :, MASK_TOKEN_0 + 1 :]], dim=2
        )

        mined_indices = mined_labels = None
        if mine_points and self.num_mined_points > 0:
            k = self.num_mined_points
            scores = uncertainty * (torch.sigmoid(refined) - torch.sigmoid(coarse))
            if self.training:
                positive, positive_weight = gumbel_top_k(scores, k, self.gumbel_tau)
                negative, negative_weight = gumbel_top_k(-scores, k, self.gumbel_tau)
                weights = torch.cat([positive_weight, negative_weight], dim=-1).unsqueeze(-1)
            else:
                positive = scores.topk(k, dim=-1).indices
                negative = (-scores).topk(k, dim=-1).indices
                weights = None
            mined_indices = torch.cat([positive, negative], dim=-1)
            gather_index = mined_indices.unsqueeze(-1).expand(-1, -1, -1, keys.shape[-1])
            # Gather first, then add: only the 2k mined cells of `keys + guided_keys` are ever needed.
            per_prompt = (batch_size, point_batch_size, -1, -1)
            content = torch.gather(keys.expand(per_prompt), 2, gather_index)
            content = content + torch.gather(guided_keys.expand(per_prompt), 2, gather_index)
            position = torch.gather(key_point_embedding.expand(per_prompt), 2, gather_index)
            labels = torch.cat(
                [mined_indices.new_ones(k), mined_indices.new_zeros(k)]
            ).expand(batch_size, point_batch_size, 2 * k)
            if weights is not None:
                # As in the release (reference 4.6): the straight-through weight multiplies the cell's positional
                # encoding and its content; the label embedding is added after, unweighted. Forward values are
                # the same either way; the gradient reaching the scores (the uncertainty branch) is not.
                content = content * weights
                position = position * weights
            position = position + point_label_embeddings[labels].to(position.dtype)
            attn_out = torch.cat([attn_out, content], dim=2)
            query_point_embedding = torch.cat([query_point_embedding, position], dim=2)
            mined_labels = labels

        def as_map(values: Tensor) -> Tensor:
            return values.reshape(batch_size, point_batch_size, 1, height, width)

        return PASamPromptAdapterOutput(
            attention_output=attn_out,
            guided_keys=guided_keys,
            query_point_embedding=query_point_embedding,
            coarse_masks=as_map(coarse),
            refined_masks=as_map(refined),
            uncertainty_maps=as_map(uncertainty),
            pa_masks=as_map(pa_mask),
            mined_indices=mined_indices,
            mined_labels=mined_labels,
        )


class PASamTwoWayAttentionBlock(SamTwoWayAttentionBlock):
    """SAM's two-way block; when given the prompt adapter, it runs it between the token-to-image attention and its
    residual add, exactly where the release does.

    Image tokens are `(B, P, N, C)`, or `(B, 1, N, C)` while they are still the same for every prompt (entering
    the first block); the image positional embedding is always `(B, 1, N, C)`. [`PASamAttention`] projects such
    shared inputs once per image.
    """

    def __init__(self, config, attention_downsample_rate: int = 2, skip_first_layer_pe: bool = False):
        super().__init__(config, attention_downsample_rate=attention_downsample_rate, skip_first_layer_pe=skip_first_layer_pe)
        self.self_attn = PASamAttention(config, downsample_rate=1)
        self.cross_attn_token_to_image = PASamAttention(config, downsample_rate=attention_downsample_rate)
        self.cross_attn_image_to_token = PASamAttention(config, downsample_rate=attention_downsample_rate)

    def forward(
        self,
        queries: Tensor,
        keys: Tensor,
        query_point_embedding: Tensor,
        key_point_embedding: Tensor,
        attention_similarity: Tensor | None,
        prompt_adapter: PASamPromptAdapter | None = None,
        adapter_kwargs: dict | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ):
        if self.skip_first_layer_pe:
            queries, _ = self.self_attn(query=queries, key=queries, value=queries)
        else:
            query = queries + query_point_embedding
            attn_out, _ = self.self_attn(query=query, key=query, value=queries)
            queries = queries + attn_out
        queries = self.layer_norm1(queries)

        # The image positional embedding is passed apart from the image tokens: it is shared by the prompts.
        attn_out, _ = self.cross_attn_token_to_image(
            query=queries + query_point_embedding,
            key=keys,
            value=keys,
            key_position=key_point_embedding,
            attention_similarity=attention_similarity,
        )
        adapter_output = None
        if prompt_adapter is not None:
            queries, keys, attn_out, query_point_embedding, adapter_output = self._run_adapter(
                prompt_adapter, adapter_kwargs, queries, keys, attn_out, query_point_embedding, key_point_embedding
            )

        queries = self.layer_norm2(queries + attn_out)
        queries = self.layer_norm3(queries + self.mlp(queries))

        attn_out, _ = self.cross_attn_image_to_token(
            query=keys, key=queries + query_point_embedding, value=queries, query_position=key_point_embedding
        )
        keys = self.layer_norm4(keys + attn_out)
        return queries, keys, attn_out, query_point_embedding, adapter_output

    def _run_adapter(
        self,
        prompt_adapter: PASamPromptAdapter,
        adapter_kwargs: dict,
        queries: Tensor,
        keys: Tensor,
        attn_out: Tensor,
        query_point_embedding: Tensor,
        key_point_embedding: Tensor,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor, PASamPromptAdapterOutput]:
        """The adapter between the token-to-image attention and its residual add: adds its tokens (and the mined
        points' zero-initialised ones) to `attn_out` and its guided keys to `keys`."""
        adapter_output = prompt_adapter(
            queries=queries,
            keys=keys,
            query_point_embedding=query_point_embedding,
            key_point_embedding=key_point_embedding,
            **adapter_kwargs,
        )
        num_new_tokens = adapter_output.attention_output.shape[2] - attn_out.shape[2]
        if num_new_tokens:
            # The mined point tokens start from zero; their whole content comes from the adapter.
            attn_out = F.pad(attn_out, (0, 0, 0, num_new_tokens))
            queries = F.pad(queries, (0, 0, 0, num_new_tokens))
        attn_out = attn_out + adapter_output.attention_output
        keys = keys + adapter_output.guided_keys
        return queries, keys, attn_out, adapter_output.query_point_embedding, adapter_output


class PASamTwoWayTransformer(SamTwoWayTransformer):
    """SAM's two-way transformer whose blocks can host the prompt adapter; the mined point tokens' positional
    embedding is carried on to the later blocks and the final token-to-image attention."""

    def __init__(self, config: PASamMaskDecoderConfig):
        super().__init__(config)
        self.adapter_layer_index = config.adapter_layer_index
        self.layers = nn.ModuleList(
            [PASamTwoWayAttentionBlock(config, skip_first_layer_pe=(i == 0)) for i in range(self.num_hidden_layers)]
        )
        self.final_attn_token_to_image = PASamAttention(config, downsample_rate=config.attention_downsample_rate)

    def forward(
        self,
        point_embeddings: Tensor,
        image_embeddings: Tensor,
        image_positional_embeddings: Tensor,
        attention_similarity: Tensor | None,
        target_embedding: Tensor | None = None,
        prompt_adapter: PASamPromptAdapter | None = None,
        adapter_kwargs: dict | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> tuple[Tensor, Tensor, PASamPromptAdapterOutput | None]:
        r"""
        Args:
            point_embeddings (`torch.Tensor` of shape `(B, P, T, C)`): the output and prompt tokens.
            image_embeddings (`torch.Tensor` of shape `(B, P, C, h, w)` or `(B, 1, C, h, w)`): the image embedding
                plus the dense prompt, per prompt or shared by all prompts of an image (no per-prompt mask).
            image_positional_embeddings (`torch.Tensor` of shape `(B, C, h, w)`): dense positional encoding.

        Returns:
            `(queries (B, P, T', C), keys (B, P, N, C), adapter_output)`.
        """
        # Shared inputs stay un-repeated: the first block projects them once per image, and its residual adds
        # broadcast them to the prompts.
        image_embeddings = image_embeddings.flatten(3).transpose(2, 3)
        image_positional_embeddings = image_positional_embeddings.flatten(2).transpose(1, 2).unsqueeze(1)

        queries = point_embeddings
        keys = image_embeddings
        query_point_embedding = point_embeddings
        adapter_output = None
        for index, layer in enumerate(self.layers):
            if target_embedding is not None:
                queries = queries + target_embedding
            with_adapter = prompt_adapter is not None and index == self.adapter_layer_index
            queries, keys, _, query_point_embedding, layer_adapter_output = layer(
                queries=queries,
                keys=keys,
                query_point_embedding=query_point_embedding,
                key_point_embedding=image_positional_embeddings,
                attention_similarity=attention_similarity,
                prompt_adapter=prompt_adapter if with_adapter else None,
                adapter_kwargs=adapter_kwargs if with_adapter else None,
                **kwargs,
            )
            if with_adapter:
                adapter_output = layer_adapter_output

        attn_out, _ = self.final_attn_token_to_image(
            query=queries + query_point_embedding, key=keys, value=keys, key_position=image_positional_embeddings
        )
        queries = self.layer_norm_final_attn(queries + attn_out)
        return queries, keys, adapter_output


class PASamMaskDecoder(SamMaskDecoder):
    """SAM's mask decoder with PA-SAM's guiding branch (`guiding_conv`) and prompt adapter (`prompt_adapter`)."""

    def __init__(self, config: PASamMaskDecoderConfig):
        super().__init__(config)
        self.transformer = PASamTwoWayTransformer(config)
        hidden_size = config.hidden_size
        # Indices 0, 1, 3, 4, 6 hold weights: the release's key names, kept so its checkpoints map one to one.
        self.guiding_conv = nn.Sequential(
            nn.Conv2d(4, hidden_size // 4, kernel_size=2, stride=2),
            SamLayerNorm(hidden_size // 4, data_format="channels_first"),
            nn.GELU(),
            nn.Conv2d(hidden_size // 4, hidden_size, kernel_size=2, stride=2),
            SamLayerNorm(hidden_size, data_format="channels_first"),
            nn.GELU(),
            nn.Conv2d(hidden_size, hidden_size, kernel_size=1),
        )
        self.prompt_adapter = PASamPromptAdapter(config)
        guiding_convs = (self.guiding_conv[0], self.guiding_conv[3], self.guiding_conv[6])
        for conv in (*guiding_convs, self.upscale_conv1, self.upscale_conv2):
            _check_patch_conv(conv)

    # The guiding branch and the upscaling are written as products over pixels (`block_conv`,
    # `pixelwise_transposed_conv`), not convolutions: every convolution in them has kernel = stride, so each output
    # pixel reads one input block, and the layer norms and GELUs act per pixel. Beside saving the scatter of each
    # upscaled image and its re-reading as tokens, this keeps convolutions out of the decoder's graph: with one
    # there, torch.compile's inductor lays every 4-D tensor feeding it out channels-last, which for the
    # `(B, P, N, C)` token tensors puts the prompt axis innermost (strided writes and a copy before every product:
    # compiled on a CPU, this decoder at P = 16 took 1.43x SAM's time with the convolutions, 0.77x without).
    def guiding_tokens(self, adapter_pixel_values: Tensor) -> Tensor:
        """The guiding branch (`guiding_conv`) as image tokens.

        Args:
            adapter_pixel_values (`torch.Tensor` of shape `(B, 4, 4h, 4w)`).

        Returns:
            `torch.Tensor` of shape `(B, h * w, C)`: `guiding_conv(adapter_pixel_values)` flattened to tokens.
        """
        conv1, norm1, act1, conv2, norm2, act2, conv3 = self.guiding_conv
        batch_size, channels, height, width = adapter_pixel_values.shape
        inner, outer = conv1.kernel_size[0], conv2.kernel_size[0]
        rows, cols = height // (inner * outer), width // (inner * outer)
        # Image row (i * outer + a) * inner + d: output pixel i, block row a of the second conv, row d of the first.
        blocks = adapter_pixel_values.reshape(batch_size, channels, rows, outer, inner, cols, outer, inner)
        blocks = blocks.permute(0, 2, 5, 3, 6, 4, 7, 1).reshape(batch_size, rows * cols, outer * outer, -1)
        # SamLayerNorm's channels_first mode only moves the channels last for nn.LayerNorm: here they already are.
        hidden = act1(nn.LayerNorm.forward(norm1, block_conv(conv1, blocks)))
        hidden = act2(nn.LayerNorm.forward(norm2, block_conv(conv2, hidden.flatten(-2))))
        return block_conv(conv3, hidden)

    def upscaled_pixels(self, image_embeddings: Tensor) -> Tensor:
        """SAM's upscaling (`upscale_conv1`, `upscale_layer_norm`, GELU, `upscale_conv2`, GELU) per image token.

        Args:
            image_embeddings (`torch.Tensor` of shape `(..., N, C)`).

        Returns:
            `torch.Tensor` of shape `(..., N * 16, C / 8)`: the upscaled pixels in block order (token, block row and
            column of the first convolution, of the second); `unblock_masks` puts products of them in image order.
        """
        upscaled = pixelwise_transposed_conv(self.upscale_conv1, image_embeddings)
        upscaled = self.activation(nn.LayerNorm.forward(self.upscale_layer_norm, upscaled))
        return self.activation(pixelwise_transposed_conv(self.upscale_conv2, upscaled))

    def unblock_masks(self, masks: Tensor, height: int, width: int) -> Tensor:
        """`(..., N * 16)` values in `upscaled_pixels`' block order -> `(..., 4 * height, 4 * width)` images."""
        first, second = self.upscale_conv1.kernel_size[0], self.upscale_conv2.kernel_size[0]
        blocks = masks.unflatten(-1, (height, width, first, first, second, second))
        lead = blocks.ndim - 6
        order = [lead + 0, lead + 2, lead + 4, lead + 1, lead + 3, lead + 5]  # rows: token, first, second; columns
        blocks = blocks.permute(*range(lead), *order)
        return blocks.reshape(*masks.shape[:-1], height * first * second, width * first * second)

    def forward(
        self,
        image_embeddings: Tensor,
        image_positional_embeddings: Tensor,
        sparse_prompt_embeddings: Tensor | None,
        dense_prompt_embeddings: Tensor,
        multimask_output: bool,
        adapter_pixel_values: Tensor | None,
        point_label_embeddings: Tensor,
        mine_points: bool,
        attention_similarity: Tensor | None = None,
        target_embedding: Tensor | None = None,
        adapter_embeddings: Tensor | None = None,
    ) -> PASamMaskDecoderOutput:
        r"""
        Args:
            image_embeddings (`torch.Tensor` of shape `(B, C, h, w)`): image encoder output.
            image_positional_embeddings (`torch.Tensor` of shape `(B, C, h, w)`): dense positional encoding.
            sparse_prompt_embeddings (`torch.Tensor` of shape `(B, P, S, C)`, *optional*): points and boxes.
            dense_prompt_embeddings (`torch.Tensor` of shape `(B, C, h, w)` or `(B, P, C, h, w)`): mask prompt (per
                image, or per prompt) or no-mask embedding.
            multimask_output (`bool`): return SAM's three multimask outputs instead of the (refined) first mask.
            adapter_pixel_values (`torch.Tensor` of shape `(B, 4, 4h, 4w)`): guiding branch input; `None` when
                `adapter_embeddings` is given.
            point_label_embeddings (`torch.Tensor` of shape `(2, C)`): negative and positive point embeddings.
            mine_points (`bool`): whether the adapter mines hard points.
            adapter_embeddings (`torch.Tensor` of shape `(B, C, h, w)`, *optional*): the guiding branch's output
                computed beforehand ([`PASamModel.get_adapter_embeddings`]); the branch is then skipped.
        """
        batch_size, _, height, width = image_embeddings.shape
        if sparse_prompt_embeddings is not None:
            point_batch_size = sparse_prompt_embeddings.shape[1]
        else:
            point_batch_size = dense_prompt_embeddings.shape[1] if dense_prompt_embeddings.ndim == 5 else 1
        output_tokens = torch.cat([self.iou_token.weight, self.mask_tokens.weight], dim=0)
        output_tokens = output_tokens.repeat(batch_size, point_batch_size, 1, 1)
        if sparse_prompt_embeddings is not None:
            tokens = torch.cat((output_tokens, sparse_prompt_embeddings), dim=2)
        else:
            tokens = output_tokens
        point_embeddings = tokens.to(self.iou_token.weight.dtype)

        # The guiding branch runs once per image, not once per prompt (or not at all when its output is given).
        if adapter_embeddings is None:
            guiding_embedding = self.guiding_tokens(adapter_pixel_values.to(self.iou_token.weight.dtype))
        else:
            # (B, C, h, w) -> (B, N, C); for get_adapter_embeddings' output this is a view of the branch's tokens.
            guiding_embedding = adapter_embeddings.to(self.iou_token.weight.dtype).flatten(2).transpose(1, 2)
            guiding_embedding = guiding_embedding.contiguous()
        guiding_embedding = guiding_embedding.unsqueeze(1)

        # Not repeated per prompt (SAM repeats both): the transformer broadcasts what all prompts share.
        if dense_prompt_embeddings.ndim == 5:
            # One mask prompt per prompt (B, P or 1, C, h, w), e.g. noisy-mask prompts in training.
            image_embeddings = image_embeddings.unsqueeze(1) + dense_prompt_embeddings
        else:
            image_embeddings = (image_embeddings + dense_prompt_embeddings).unsqueeze(1)

        point_embedding, image_embeddings, adapter_output = self.transformer(
            point_embeddings=point_embeddings,
            image_embeddings=image_embeddings,
            image_positional_embeddings=image_positional_embeddings,
            attention_similarity=attention_similarity,
            target_embedding=target_embedding,
            prompt_adapter=self.prompt_adapter,
            adapter_kwargs={
                "guiding_embedding": guiding_embedding,
                "point_label_embeddings": point_label_embeddings,
                "mine_points": mine_points,
                "embedding_size": (height, width),
            },
        )
        iou_token_out = point_embedding[:, :, 0, :]
        mask_tokens_out = point_embedding[:, :, 1 : (1 + self.num_mask_tokens), :]

        # All three multimask outputs (the release drops one of them; see the reference's known defects).
        mask_slice = slice(1, None) if multimask_output else slice(0, 1)
        # Every hypernetwork runs (the unused ones then get zero gradients, as in SAM, so DDP sees all parameters);
        # only the returned masks are multiplied out.
        hyper_in = torch.stack(
            [mlp(mask_tokens_out[:, :, i, :]) for i, mlp in enumerate(self.output_hypernetworks_mlps)], dim=2
        )[:, :, mask_slice]
        pixels = self.upscaled_pixels(image_embeddings)  # (B, P, N * 16, C / 8), in block order
        masks = self.unblock_masks(hyper_in @ pixels.transpose(-1, -2), height, width)
        iou_pred = self.iou_prediction_head(iou_token_out)
        return PASamMaskDecoderOutput(
            masks=masks, iou_scores=iou_pred[:, :, mask_slice], adapter_output=adapter_output
        )


class PASamModel(SamModel):
    r"""
    PA-SAM: Segment Anything with a prompt adapter in the mask decoder.

    Same inputs as [`SamModel`] plus `adapter_pixel_values`, same image encoder and prompt encoder, and a mask
    decoder ([`PASamMaskDecoder`]) whose prompt adapter refines the first mask token with an uncertainty map and
    mined hard points. The default output is the single refined mask (`config.multimask_output=False`).

    Example:

    ```python
    >>> from pasam_hf import PASamModel, PASamProcessor
    >>> model = PASamModel.from_pretrained("path/to/pa-sam-vit-l")
    >>> processor = PASamProcessor.from_pretrained("path/to/pa-sam-vit-l")
    >>> inputs = processor(images=image, input_boxes=[[[75, 275, 1725, 850]]], return_tensors="pt")
    >>> outputs = model(**inputs)
    >>> masks = processor.post_process_masks(outputs.pred_masks, inputs["original_sizes"], inputs["reshaped_input_sizes"])
    ```
    """

    config: PASamConfig
    config_class = PASamConfig
    # With config.decoder_in_fp32, from_pretrained(dtype=bf16/fp16) keeps these in float32 (set per instance).
    PROMPT_SIDE_MODULES = ("shared_image_embedding", "prompt_encoder", "mask_decoder")

    def __init__(self, config: PASamConfig):
        # SamModel.__init__ would build a plain SamMaskDecoder first; build the same modules with ours instead.
        SamPreTrainedModel.__init__(self, config)
        keep_fp32 = getattr(config, "decoder_in_fp32", True)
        # With config.decoder_in_fp32 the prompt side is created in float32 under a half-precision default dtype: a
        # model built in a low dtype (`AutoModel.from_config(config, dtype=torch.bfloat16)`, `_from_config`) then has
        # the same dtypes as one loaded with `from_pretrained(..., dtype=torch.bfloat16)`.
        low_default = torch.get_default_dtype() in (torch.float16, torch.bfloat16)
        prompt_side_dtype = torch.float32 if keep_fp32 and low_default else torch.get_default_dtype()
        with local_torch_dtype(prompt_side_dtype):
            self.shared_image_embedding = SamPositionalEmbedding(config.vision_config)
        self.vision_encoder = SamVisionEncoder(config.vision_config)
        with local_torch_dtype(prompt_side_dtype):
            self.prompt_encoder = SamPromptEncoder(config)
            # The decoder is no PreTrainedModel, so it reads the attention implementation from its config.
            config.mask_decoder_config._attn_implementation = config._attn_implementation
            self.mask_decoder = PASamMaskDecoder(config.mask_decoder_config)
        if keep_fp32:
            self._keep_in_fp32_modules_strict = list(self.PROMPT_SIDE_MODULES)
        self.post_init()

    def to_inference_dtype(self, dtype: torch.dtype) -> "PASamModel":
        """Cast to `dtype` the way `from_pretrained(..., dtype=dtype)` loads: with `config.decoder_in_fp32` (the
        default) only the image encoder takes a half-precision `dtype`, the prompt side stays float32. A plain
        `model.to(dtype)` casts everything. Returns the model."""
        if dtype not in (torch.float16, torch.bfloat16) or not getattr(self.config, "decoder_in_fp32", True):
            return self.to(dtype)
        # Child by child: a round trip of the prompt side through the low dtype would round its fp32 weights.
        for name, module in self.named_children():
            module.to(torch.float32 if name in self.PROMPT_SIDE_MODULES else dtype)
        return self

    @torch.no_grad()
    def get_image_embeddings(self, pixel_values: Tensor, **kwargs: Unpack[TransformersKwargs]) -> Tensor:
        """[`SamModel.get_image_embeddings`] with `pixel_values` cast to the image encoder's dtype, which is not
        `model.dtype` when the prompt side stays in float32 (`config.decoder_in_fp32`).

        Returns:
            `torch.Tensor` of shape `(batch_size, hidden_size, h, w)`, in the image encoder's dtype.
        """
        return super().get_image_embeddings(pixel_values.to(self._encoder_dtype()), **kwargs)

    @torch.no_grad()
    def get_adapter_embeddings(self, adapter_pixel_values: Tensor) -> Tensor:
        r"""The guiding branch's output, PA-SAM's counterpart of [`get_image_embeddings`]: it depends on the image
        alone, so an interactive tool computes it once per image and passes it to `forward` as
        `adapter_embeddings` (with `image_embeddings`) for every prompt; the masks are those of the uncached call.
        Computed without gradients, like `get_image_embeddings`: to train the guiding branch, pass
        `adapter_pixel_values` to `forward` instead.

        Args:
            adapter_pixel_values (`torch.Tensor` of shape `(batch_size, 4, 4h, 4w)`): as returned by
                [`PASamProcessor`] (or [`compute_adapter_pixel_values`]), `(batch_size, 4, 256, 256)` at SAM's 1024.

        Returns:
            `torch.Tensor` of shape `(batch_size, hidden_size, h, w)` (`(batch_size, 256, 64, 64)` at SAM's 1024), in
            the mask decoder's dtype.

        Example:

        ```python
        >>> inputs = processor(images=image, return_tensors="pt")
        >>> image_embeddings = model.get_image_embeddings(inputs["pixel_values"])
        >>> adapter_embeddings = model.get_adapter_embeddings(inputs["adapter_pixel_values"])
        >>> prompts = processor(images=image, input_points=[[[[450, 600]]]], return_tensors="pt")  # every click
        >>> outputs = model(image_embeddings=image_embeddings, adapter_embeddings=adapter_embeddings,
        ...                 input_points=prompts["input_points"])
        ```
        """
        self._check_adapter_pixel_values(adapter_pixel_values, adapter_pixel_values.shape[0])
        decoder = self.mask_decoder
        tokens = decoder.guiding_tokens(adapter_pixel_values.to(decoder.iou_token.weight.dtype))
        side = self.config.prompt_encoder_config.image_embedding_size
        # A view of the (B, N, C) tokens: forward's flatten and transpose give them back without a copy.
        return tokens.transpose(1, 2).unflatten(2, (side, side))

    def _check_adapter_pixel_values(self, adapter_pixel_values: Tensor, batch_size: int) -> None:
        expected = (batch_size, 4, self.adapter_size, self.adapter_size)
        if tuple(adapter_pixel_values.shape) != expected:
            raise ValueError(
                f"adapter_pixel_values must have shape {expected}, got {tuple(adapter_pixel_values.shape)}; "
                "use the PASamProcessor that ships with this checkpoint to make it."
            )

    def _encoder_dtype(self) -> torch.dtype:
        return self.vision_encoder.patch_embed.projection.weight.dtype

    @property
    def adapter_size(self) -> int:
        """Side of `adapter_pixel_values`: 4 x the image embedding side (256 for SAM's 1024 input)."""
        return 4 * self.config.prompt_encoder_config.image_embedding_size

    def set_point_mining(self, enabled: bool) -> None:
        """Switch hard point mining on or off for training mode (it always runs in eval mode).

        The release trains 5 epochs without it; `pasam_hf.training` flips this switch after the warm-up.
        """
        self.config.mask_decoder_config.point_mining_in_training = bool(enabled)

    def compute_adapter_pixel_values(self, pixel_values: Tensor) -> Tensor:
        """`adapter_pixel_values` from SAM `pixel_values`, with this model's edge mode (what the processor does)."""
        decoder_config = self.config.mask_decoder_config
        return compute_adapter_pixel_values(
            pixel_values,
            adapter_size=self.adapter_size,
            edge_mode=decoder_config.edge_mode,
            low_threshold=decoder_config.canny_low_threshold,
            high_threshold=decoder_config.canny_high_threshold,
        )

    @merge_with_config_defaults
    @capture_outputs
    def forward(
        self,
        pixel_values: Tensor | None = None,
        input_points: Tensor | None = None,
        input_labels: torch.LongTensor | None = None,
        input_boxes: Tensor | None = None,
        input_masks: torch.LongTensor | None = None,
        image_embeddings: Tensor | None = None,
        multimask_output: bool | None = None,
        attention_similarity: Tensor | None = None,
        target_embedding: Tensor | None = None,
        adapter_pixel_values: Tensor | None = None,
        labels: Tensor | None = None,
        mine_points: bool | None = None,
        adapter_embeddings: Tensor | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> PASamImageSegmentationOutput:
        r"""
        Arguments as in [`SamModel.forward`], plus:

        adapter_pixel_values (`torch.Tensor` of shape `(batch_size, 4, 256, 256)`, *optional*):
            Input of the guiding branch (SAM pixel values at 256 and their Canny edge map), as returned by
            [`PASamProcessor`]. Computed from `pixel_values` when omitted; with `image_embeddings`, give it or
            `adapter_embeddings`.
        input_masks (`torch.Tensor` of shape `(batch_size, point_batch_size, 256, 256)`, *optional*):
            Mask logits as prompts, one per prompt; `(batch_size, 1, 256, 256)` is SAM's one mask per image.
        multimask_output (`bool`, *optional*, defaults to `config.multimask_output`, i.e. `False`):
            `False` returns the first mask, the one the adapter refines; `True` returns SAM's three other masks.
        labels (`torch.Tensor` of shape `(batch_size, point_batch_size, height, width)`, *optional*):
            Ground-truth masks at the model input's resolution or any other: values in [0, 1] are targets (hard
            1 foreground / 0 background, or soft fractions at object edges as the release's bilinearly resized
            labels), any other value (255) is ignored; when given, `loss` is returned (see
            [`pasam_hf.losses.pasam_loss`]).
        mine_points (`bool`, *optional*):
            Override hard point mining: defaults to always in eval mode and to
            `config.mask_decoder_config.point_mining_in_training` in training mode.
        adapter_embeddings (`torch.Tensor` of shape `(batch_size, hidden_size, 64, 64)`, *optional*):
            The guiding branch's output from [`get_adapter_embeddings`], instead of `adapter_pixel_values`: with
            `image_embeddings`, everything that depends on the image alone is computed once and each prompt costs
            only the prompt encoder and the mask decoder. The masks equal those of the uncached call.
        """
        if pixel_values is None and image_embeddings is None:
            raise ValueError("Either pixel_values or image_embeddings must be provided.")
        if pixel_values is not None and image_embeddings is not None:
            raise ValueError("Only one of pixel_values and image_embeddings can be provided.")
        if input_points is None and input_boxes is None and input_masks is None:
            # SAM would still return a mask, one that no prompt asked for.
            raise ValueError(
                "PA-SAM needs a prompt: pass input_points, input_boxes or input_masks (see PASamProcessor). To "
                "segment everything in an image, use pipeline('mask-generation', model=...)."
            )
        if input_points is not None and input_points.ndim != 4:
            raise ValueError(
                "input_points must be a 4D tensor of shape (batch_size, point_batch_size, points_per_prompt, 2), "
                f"got shape {tuple(input_points.shape)}."
            )
        if input_boxes is not None and input_boxes.ndim != 3:
            raise ValueError(
                f"input_boxes must be a 3D tensor of shape (batch_size, num_boxes, 4), got {tuple(input_boxes.shape)}."
            )
        if input_points is not None and input_boxes is not None and input_points.shape[1] != input_boxes.shape[1]:
            raise ValueError(
                "input_points and input_boxes must describe the same prompts: got "
                f"{input_points.shape[1]} point prompts and {input_boxes.shape[1]} boxes per image."
            )
        batch_size = pixel_values.shape[0] if pixel_values is not None else image_embeddings.shape[0]
        if input_masks is not None:
            input_masks = self._check_input_masks(input_masks, batch_size, input_points, input_boxes)
        for name, prompt in (("input_points", input_points), ("input_boxes", input_boxes)):
            if prompt is not None and prompt.shape[0] != batch_size:
                raise ValueError(
                    f"{name} has batch size {prompt.shape[0]} but there are {batch_size} images; pass one entry "
                    "per image (several prompts per image go in the second dimension)."
                )

        if adapter_embeddings is not None:
            if adapter_pixel_values is not None:
                raise ValueError(
                    "Only one of adapter_pixel_values and adapter_embeddings can be provided: adapter_embeddings is "
                    "the guiding branch's output for them (model.get_adapter_embeddings(adapter_pixel_values))."
                )
            side = self.config.prompt_encoder_config.image_embedding_size
            expected = (batch_size, self.config.mask_decoder_config.hidden_size, side, side)
            if tuple(adapter_embeddings.shape) != expected:
                raise ValueError(
                    f"adapter_embeddings must have shape {expected}, got {tuple(adapter_embeddings.shape)}; make "
                    "them with model.get_adapter_embeddings(adapter_pixel_values) of this model."
                )
        elif adapter_pixel_values is None:
            if pixel_values is None:
                raise ValueError(
                    "adapter_pixel_values is required when image_embeddings are given: the guiding branch needs the "
                    "image. Pass the `adapter_pixel_values` returned by PASamProcessor (or "
                    "`model.compute_adapter_pixel_values(pixel_values)`), or their `model.get_adapter_embeddings(...)`"
                    " as adapter_embeddings, together with image_embeddings."
                )
            if torch.compiler.is_exporting():
                # torch.compile runs the host-side edge map outside its graph; an exported program has no outside.
                raise ValueError(
                    "torch.export cannot trace the adapter's edge map (NumPy/OpenCV on the host): pass "
                    "adapter_pixel_values (from PASamProcessor, or model.compute_adapter_pixel_values(pixel_values) "
                    "before calling the exported program) as an input of the exported model."
                )
            adapter_pixel_values = self.compute_adapter_pixel_values(pixel_values)
        if adapter_pixel_values is not None:
            self._check_adapter_pixel_values(adapter_pixel_values, batch_size)
        if multimask_output is None:
            multimask_output = self.config.multimask_output
        if mine_points is None:
            mine_points = not self.training or self.config.mask_decoder_config.point_mining_in_training

        # The prompt side may run in another dtype than the image encoder (config.decoder_in_fp32): every input
        # meets the weights of the module that reads it in their dtype.
        decoder_dtype = self.mask_decoder.iou_token.weight.dtype
        prompt_dtype = self.shared_image_embedding.positional_embedding.dtype
        if input_points is not None:
            input_points = input_points.to(prompt_dtype)
        if input_boxes is not None:
            input_boxes = input_boxes.to(prompt_dtype)
        if input_masks is not None:
            input_masks = input_masks.to(self.prompt_encoder.mask_embed.conv1.weight.dtype)

        image_positional_embeddings = self.get_image_wide_positional_embeddings().to(decoder_dtype)
        image_positional_embeddings = image_positional_embeddings.repeat(batch_size, 1, 1, 1)

        vision_attentions = None
        vision_hidden_states = None
        if pixel_values is not None:
            vision_outputs = self.vision_encoder(pixel_values.to(self._encoder_dtype()), **kwargs)
            image_embeddings = vision_outputs.last_hidden_state
            vision_hidden_states = vision_outputs.hidden_states
            vision_attentions = vision_outputs.attentions
        image_embeddings = image_embeddings.to(decoder_dtype)

        if input_points is not None and input_labels is None:
            input_labels = torch.ones_like(input_points[:, :, :, 0], dtype=torch.int, device=input_points.device)

        sparse_embeddings, dense_embeddings = self.prompt_encoder(
            input_points=input_points,
            input_labels=input_labels,
            input_boxes=input_boxes,
            input_masks=None,
        )
        if input_masks is not None:
            # Embedded per prompt: (B, P, M, M) -> (B, P, C, h, w); P = 1 is SAM's one mask per image.
            mask_batch, mask_prompts = input_masks.shape[:2]
            dense_embeddings = self.prompt_encoder.mask_embed(
                input_masks.reshape(mask_batch * mask_prompts, 1, *input_masks.shape[-2:])
            )
            dense_embeddings = dense_embeddings.reshape(mask_batch, mask_prompts, *dense_embeddings.shape[1:])
        point_label_embeddings = torch.cat(
            [self.prompt_encoder.point_embed[0].weight, self.prompt_encoder.point_embed[1].weight], dim=0
        )
        decoder_output = self.mask_decoder(
            image_embeddings=image_embeddings,
            image_positional_embeddings=image_positional_embeddings,
            sparse_prompt_embeddings=sparse_embeddings,
            dense_prompt_embeddings=dense_embeddings,
            multimask_output=multimask_output,
            adapter_pixel_values=adapter_pixel_values,
            point_label_embeddings=point_label_embeddings,
            mine_points=mine_points,
            attention_similarity=attention_similarity,
            target_embedding=target_embedding,
            adapter_embeddings=adapter_embeddings,
        )
        adapter_output = decoder_output.adapter_output

        mined_point_coords = None
        if adapter_output.mined_indices is not None:
            height, width = adapter_output.coarse_masks.shape[-2:]
            image_size = self.config.prompt_encoder_config.image_size
            rows = torch.div(adapter_output.mined_indices, width, rounding_mode="floor")
            cols = adapter_output.mined_indices - rows * width
            mined_point_coords = torch.stack(
                [(cols + 0.5) * (image_size / width), (rows + 0.5) * (image_size / height)], dim=-1
            )

        loss = None
        if labels is not None:
            loss = pasam_loss(
                pred_masks=decoder_output.masks,
                coarse_masks=adapter_output.coarse_masks,
                refined_masks=adapter_output.refined_masks,
                uncertainty_maps=adapter_output.uncertainty_maps,
                labels=labels,
            )

        return PASamImageSegmentationOutput(
            iou_scores=decoder_output.iou_scores,
            pred_masks=decoder_output.masks,
            vision_hidden_states=vision_hidden_states,
            vision_attentions=vision_attentions,
            loss=loss,
            coarse_masks=adapter_output.coarse_masks,
            refined_masks=adapter_output.refined_masks,
            uncertainty_maps=adapter_output.uncertainty_maps,
            pa_masks=adapter_output.pa_masks,
            mined_point_coords=mined_point_coords,
            mined_point_labels=adapter_output.mined_labels,
        )

    def _check_input_masks(
        self, input_masks: Tensor, batch_size: int, input_points: Tensor | None, input_boxes: Tensor | None
    ) -> Tensor:
        """Mask prompts as `(B, P, M, M)`: `(B, M, M)` and SAM's `(B, 1, M, M)` mean one mask per image."""
        size = 4 * self.config.prompt_encoder_config.image_embedding_size
        if input_masks.ndim == 3:
            input_masks = input_masks.unsqueeze(1)
        if input_masks.ndim != 4 or tuple(input_masks.shape[-2:]) != (size, size) or input_masks.shape[0] != batch_size:
            raise ValueError(
                f"input_masks must have shape (batch_size, point_batch_size, {size}, {size}) (one mask logit map per "
                f"prompt) or (batch_size, 1, {size}, {size}) (one per image) with batch_size={batch_size}; got "
                f"{tuple(input_masks.shape)}."
            )
        sparse = input_points if input_points is not None else input_boxes
        if sparse is not None and input_masks.shape[1] not in (1, sparse.shape[1]):
            raise ValueError(
                f"input_masks has {input_masks.shape[1]} masks per image but there are {sparse.shape[1]} point/box "
                "prompts per image; pass one mask per prompt or one per image."
            )
        return input_masks.to(self.prompt_encoder.mask_embed.conv1.weight.dtype)

    def adapter_state_dict_keys(self) -> list[str]:
        """Names of the parameters PA-SAM adds to SAM (guiding branch and prompt adapter)."""
        return [
            name
            for name in self.state_dict()
            if name.startswith(("mask_decoder.guiding_conv.", "mask_decoder.prompt_adapter."))
        ]

    def zero_adapter_outputs_(self) -> None:
        """Zero the last layer of each adapter branch that feeds SAM, so the model computes exactly SAM's masks
        while point mining is off (and stays close to SAM with it on); every adapter tensor still gets gradient
        once training moves these layers away from zero."""
        with torch.no_grad():
            for layer in (
                self.mask_decoder.guiding_conv[6],
                self.mask_decoder.prompt_adapter.cross_attn_token_to_image.out_proj,
                self.mask_decoder.prompt_adapter.refined_mlp.proj_out,
            ):
                layer.weight.zero_()
                layer.bias.zero_()

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, **kwargs) -> "PASamModel":
        r"""[`PreTrainedModel.from_pretrained`], strict where silence would give wrong masks (see
        `pasam_hf.loading.load_pretrained_strict`): weights are read from safetensors only unless
        `use_safetensors=False` is passed, and a config.json of another model type or missing PA-SAM settings, a
        truncated or corrupt weights file, or weights that are missing, unused or of the wrong shape (which
        transformers would initialise randomly) raise one `pasam_hf.loading.ModelLoadError` naming the file and the
        fix. Config fields PA-SAM does not declare load, as in transformers, with one warning naming them.
        """
        from .loading import load_pretrained_strict

        return load_pretrained_strict(super().from_pretrained, pretrained_model_name_or_path, *model_args, **kwargs)

    @classmethod
    def from_sam_pretrained(
        cls,
        pretrained_model_name_or_path: str,
        adapter_init: str = "zero",
        adapter_config: dict | None = None,
        adapter: str | None = None,
        **kwargs,
    ) -> "PASamModel":
        """Load a SAM checkpoint (an HF `SamModel` repo id or directory) into a PA-SAM model.

        Every SAM weight is loaded; the only missing keys must be the adapter's, which are initialised and
        reported. Any other missing or unexpected key raises.

        Args:
            pretrained_model_name_or_path (`str`): SAM checkpoint, e.g. `"facebook/sam-vit-base"` or a directory.
            adapter_init (`str`, defaults to `"zero"`): `"zero"` zeroes the adapter's output layers so the
                untrained model starts as SAM (see [`zero_adapter_outputs_`]); `"random"` keeps the default
                random initialisation, as the release does.
            adapter_config (`dict`, *optional*): adapter settings for [`PASamMaskDecoderConfig`], e.g.
                `{"edge_mode": "rgb"}`.
            adapter (`str`, *optional*): an adapter-only artifact (directory or Hub id written by
                `pasam_hf.adapters.save_adapter`, or the output of `pasam train`, whose `adapter/` holds one) to
                load on top of the SAM weights, fetched with this call's `token`, `cache_dir` and
                `local_files_only`; its adapter settings are used (an `adapter_config` entry that contradicts them
                raises) and `adapter_init` is ignored.
            **kwargs (*optional*): passed to `from_pretrained` (`revision`, `dtype`, `device_map`, `token`, ...).
        """
        if adapter_init not in ("zero", "random"):
            raise ValueError(f"adapter_init must be 'zero' or 'random', got {adapter_init!r}.")
        config_kwargs = {
            key: kwargs[key]
            for key in ("revision", "token", "cache_dir", "local_files_only", "subfolder")
            if key in kwargs
        }
        sam_config = SamConfig.from_pretrained(pretrained_model_name_or_path, **config_kwargs)
        if sam_config.model_type not in ("sam", "pa_sam"):
            raise ValueError(
                f"{pretrained_model_name_or_path} holds a {sam_config.model_type!r} model, not SAM; "
                "from_sam_pretrained takes SAM checkpoints (model_type 'sam')."
            )
        # The adapter comes from the cache the SAM weights come from (`revision` is the SAM repo's).
        adapter_hub_kwargs = {key: kwargs[key] for key in ("token", "cache_dir", "local_files_only") if key in kwargs}
        if adapter is not None:
            from .adapters import read_adapter_config

            saved_settings = read_adapter_config(adapter, **adapter_hub_kwargs)["adapter_settings"]
            conflicts = {key: value for key, value in (adapter_config or {}).items()
                         if key in saved_settings and saved_settings[key] != value}
            if conflicts:
                raise ValueError(
                    f"adapter_config {conflicts} contradicts the settings adapter {adapter} was trained with "
                    f"({ {key: saved_settings[key] for key in conflicts} }); drop them from adapter_config."
                )
            adapter_config = {**saved_settings, **(adapter_config or {})}
        config = PASamConfig.from_sam_config(sam_config, **(adapter_config or {}))
        # transformers' load report would list every adapter tensor as MISSING ("newly initialized"), also when
        # `adapter` then loads them: the checks below replace it (any other missing or unexpected key raises).
        report_logger = logging.get_logger("transformers.modeling_utils")
        report_level = report_logger.level
        report_logger.setLevel(logging.ERROR)
        try:
            model, info = super().from_pretrained(
                pretrained_model_name_or_path, config=config, output_loading_info=True, **kwargs
            )
        finally:
            report_logger.setLevel(report_level)
        adapter_keys = set(model.adapter_state_dict_keys())
        missing = set(info["missing_keys"])
        unexpected = set(info["unexpected_keys"]) | set(info.get("mismatched_keys", []))
        if missing - adapter_keys or unexpected:
            raise ValueError(
                f"{pretrained_model_name_or_path} is not a SAM checkpoint this model can load: "
                f"missing {sorted(missing - adapter_keys)}, unexpected or mismatched {sorted(map(str, unexpected))}."
            )
        # transformers creates the missing (adapter) tensors in the requested dtype but loads the SAM decoder's in
        # fp32 when config.decoder_in_fp32 holds: bring the adapter to the dtype of the decoder it lives in.
        model.mask_decoder.to(model.mask_decoder.iou_token.weight.dtype)
        if adapter is not None:
            from .adapters import load_adapter

            logger.info(f"Loaded SAM weights from {pretrained_model_name_or_path} and the PA-SAM adapter {adapter}.")
            return load_adapter(model, adapter, **adapter_hub_kwargs)
        logger.warning(
            f"Loaded SAM weights from {pretrained_model_name_or_path}; the {len(missing)} PA-SAM adapter tensors "
            f"(mask_decoder.guiding_conv.*, mask_decoder.prompt_adapter.*) are new and initialised "
            f"({adapter_init!r}). Fine-tune them (pasam train) or load released PA-SAM weights (pasam convert)."
        )
        if adapter_init == "zero":
            model.zero_adapter_outputs_()
        return model


__all__ = [
    "PASamImageSegmentationOutput",
    "PASamMaskDecoder",
    "PASamModel",
    "PASamPromptAdapter",
    "gumbel_top_k",
]
