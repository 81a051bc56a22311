"""IP-Adapter's weights as NNX modules (Ye et al., 2023, "IP-Adapter: Text Compatible Image Prompt Adapter for
Text-to-Image Diffusion Models", arXiv 2308.06721, §3.2; official code tencent-ailab/IP-Adapter
`ip_adapter/ip_adapter.py` (`ImageProjModel`) and `ip_adapter/attention_processor.py` (`IPAttnProcessor`)).

- `ImageProjModel`: a global image embedding [B, E] (CLIP's in the paper) -> Linear(E, M * C) -> reshape to M
  tokens -> LayerNorm(C): M "image prompt" tokens in the width C of the text context.
- `DecoupledCrossAttention`: a cross-attention layer whose queries come from the latent tokens and whose keys and
  values come from two streams: the text context through to_k / to_v and the image tokens through the new,
  bias-free to_k_ip / to_v_ip, attended separately and added with weight lambda (`attnx` mechanism `ip_adapter`,
  attnx/ops/cross/multi_stream.py) before to_out. As in the code, to_k_ip / to_v_ip start as copies of to_k / to_v
  when the two contexts have the same width.

Several reference images (image tokens [B, O, M, C], one set per object), merged one of two ways (`merge`):
- "concat": every object's tokens in one image stream (one softmax over O * M tokens), what IP-Adapter does with
  several image prompts and the baseline that MIP-Adapter improves on.
- "mip": MIP-Adapter (Huang et al., 2024, arXiv 2409.17920, §3.2 "Weighted-merge"; hqhQAQ/MIP-Adapter
  `ip_adapter/attention_processor_multi.py`): one stream per object, weighted per latent position by the
  relevance of the object's entity phrase (its tokens through the *text* to_k, softmax over positions, mean over
  heads and phrase tokens after BOS, normalised across objects) times the text gate sigmoid(text_to_weight .
  T(t)) / mean_t (T: the text stream's output before to_out). `text_to_weight` is a bias-free Linear(N * H, 1)
  with torch's default init, as in the code (attnx/ops/cross/mip.py holds the math). The per-call inputs are the
  entity phrases [B, O, L, C] (position 0 a BOS token) and their lengths [B, O].

A dense extra stream (`dense_dim` > 0): DPDEdit (Wang et al., 2024, arXiv 2409.01086, §3.3): the texture
network's feature map at the matching layer, flattened to h * w tokens, through its own to_k_c / to_v_c, added
with weight `dense_scale`, unmasked. DPDEdit's code is public only as compiled files, so the initialisation is ours:
to_k_c / to_v_c start as copies of to_k / to_v when the widths agree (IP-Adapter's rule), else fan-in normal.

In the DiT (models/dit.py, `DiTConfig.image_prompt_tokens`), the class-conditional model has no text encoder; the
base stream is its label embedding as a one-token context (the null class when labels are dropped), and the output
projection starts at zero so that the block stays the identity at initialisation (adaLN-Zero, DiT §3.2); the
paper's UNet instead starts from a pretrained text cross-attention and zero is not needed there.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from attnx.ops.cross.mip import mip_object_weights
from attnx.ops.cross.multi_stream import ip_adapter_attention, multi_stream_cross_attention
from models.layers.norm import LayerNorm

LAYER_NORM_EPS = 1e-5  # torch.nn.LayerNorm's default, used by ImageProjModel


class ImageProjModel(nnx.Module):
    """image_embeds [B, E] -> image prompt tokens [B, M, C] (Linear with bias, reshape, LayerNorm with gain/bias)."""

    def __init__(self, embed_dim: int, context_dim: int, num_tokens: int, *, rngs: nnx.Rngs,
                 param_dtype=jnp.float32):
        for name, value in (("embed_dim", embed_dim), ("context_dim", context_dim), ("num_tokens", num_tokens)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"ImageProjModel.{name} must be a positive int, got {value!r}")
        self.num_tokens = num_tokens
        self.context_dim = context_dim
        init = nnx.initializers.variance_scaling(1.0, "fan_in", "truncated_normal")
        self.proj_em = nnx.Param(init(rngs.params(), (embed_dim, num_tokens * context_dim), param_dtype))
        self.proj_bias_m = nnx.Param(jnp.zeros((num_tokens * context_dim,), param_dtype))
        self.norm = LayerNorm(context_dim, eps=LAYER_NORM_EPS, param_dtype=param_dtype)

    def __call__(self, image_embeds: jax.Array) -> jax.Array:
        if image_embeds.ndim != 2 or image_embeds.shape[-1] != self.proj_em.shape[0]:
            raise ValueError(f"ImageProjModel expects image_embeds [B, {self.proj_em.shape[0]}], got "
                             f"{image_embeds.shape}")
        tokens = image_embeds @ self.proj_em[...] + self.proj_bias_m[...]
        return self.norm(tokens.reshape(image_embeds.shape[0], self.num_tokens, self.context_dim))


def _check_int(owner: str, name: str, value, minimum: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{owner}.{name} must be an int >= {minimum}, got {value!r}")


def _check_number(owner: str, name: str, value, what: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{owner}.{name} must be a number ({what}), got {value!r}")


def check_image_prompt_options(owner: str, *, tokens: int, dim: int, scale, merge: str, dense_dim: int,
                               dense_scale) -> None:
    """Validates a model's image-prompt options (DiTConfig's image_prompt_* and dense_prompt_* fields)."""
    _check_int(owner, "image_prompt_tokens", tokens, 0)
    _check_int(owner, "image_prompt_dim", dim, 1)
    _check_number(owner, "image_prompt_scale", scale, "λ")
    if merge not in MERGES:
        raise ValueError(f"{owner}.image_prompt_merge must be one of {MERGES} (several reference images: one "
                         f"stream of all their tokens, or MIP-Adapter's weighted merge), got {merge!r}")
    if merge == "mip" and not tokens:
        raise ValueError(f"{owner}.image_prompt_merge='mip' needs image prompts (image_prompt_tokens >= 1)")
    _check_int(owner, "dense_prompt_dim", dense_dim, 0)
    _check_number(owner, "dense_prompt_scale", dense_scale, "the dense stream's weight")


MERGES = ("concat", "mip")


class DecoupledCrossAttention(nnx.Module):
    """x [B, T, D], text context [B, S, C], image tokens [B, M, C_i] or [B, O, M, C_i] -> [B, T, D]:
    to_out(Attn(q, to_k(text), to_v(text)) + sum over image streams + dense_scale * Attn(q, to_k_c(dense), ...)).

    scale: lambda (`image_prompt_scale`), overridable per call. zero_out: start to_out at zero (identity residual
    branch). use_bias: biases on to_q / to_k / to_v / to_out (DiT style); to_k_ip / to_v_ip never have one, as in
    the code. merge: how several reference images combine ("concat" or "mip", module docstring). dense_dim: width
    of DPDEdit's dense stream (0: none); dense_scale: its weight, overridable per call. image_dim 0: no image
    stream (a dense stream only).
    """

    def __init__(self, width: int, num_heads: int, *, context_dim: int | None = None, image_dim: int | None = None,
                 scale: float = 1.0, use_bias: bool = True, zero_out: bool = True, merge: str = "concat",
                 dense_dim: int = 0, dense_scale: float = 1.0, rngs: nnx.Rngs, param_dtype=jnp.float32):
        if width % num_heads:
            raise ValueError(f"DecoupledCrossAttention: width={width} is not divisible by num_heads={num_heads}")
        context_dim = width if context_dim is None else context_dim
        image_dim = context_dim if image_dim is None else image_dim
        check_image_prompt_options("DecoupledCrossAttention", tokens=int(image_dim > 0), dim=max(image_dim, 1),
                                   scale=scale, merge=merge, dense_dim=dense_dim, dense_scale=dense_scale)
        self.kind = "ip_adapter"  # the registry name of the mechanism (configs test, model summaries)
        self.scale, self.dense_scale, self.merge = float(scale), float(dense_scale), merge
        head_dim = width // num_heads
        init = nnx.initializers.variance_scaling(1.0, "fan_in", "truncated_normal", in_axis=0, out_axis=(1, 2))
        param = lambda fan_in: nnx.Param(init(rngs.params(), (fan_in, num_heads, head_dim), param_dtype))
        self.query_dnh = param(width)
        self.key_cnh = param(context_dim)
        self.value_cnh = param(context_dim)

        def copies_or_new(dim):  # the code initialises to_k_ip / to_v_ip from to_k / to_v
            if dim == context_dim:
                return nnx.Param(self.key_cnh[...]), nnx.Param(self.value_cnh[...])
            return param(dim), param(dim)

        self.image_key_cnh, self.image_value_cnh = copies_or_new(image_dim) if image_dim else (None, None)
        out_init = nnx.initializers.zeros if zero_out else nnx.initializers.variance_scaling(
            1.0, "fan_in", "truncated_normal", in_axis=(0, 1), out_axis=2)
        self.out_nhd = nnx.Param(out_init(rngs.params(), (num_heads, head_dim, width), param_dtype))
        zeros = lambda *shape: nnx.Param(jnp.zeros(shape, param_dtype)) if use_bias else None
        self.query_bias_nh, self.key_bias_nh = zeros(num_heads, head_dim), zeros(num_heads, head_dim)
        self.value_bias_nh, self.out_bias_d = zeros(num_heads, head_dim), zeros(width)
        # Built after every IP-Adapter weight, so that the plain layer draws the same numbers with these on or off.
        bound = (num_heads * head_dim) ** -0.5  # torch.nn.Linear's default: U(±1/sqrt(fan_in))
        self.text_weight_c = (nnx.Param(jax.random.uniform(rngs.params(), (num_heads * head_dim,), param_dtype,
                                                           -bound, bound)) if merge == "mip" else None)
        self.dense_key_cnh, self.dense_value_cnh = copies_or_new(dense_dim) if dense_dim else (None, None)

    def _bias(self, x, bias):
        return x if bias is None else x + bias[...]

    def __call__(self, x: jax.Array, context: jax.Array, image_tokens: jax.Array | None = None, *,
                 scale: float | jax.Array | None = None, entity_context: jax.Array | None = None,
                 entity_lengths: jax.Array | None = None, dense_tokens: jax.Array | None = None,
                 dense_scale: float | jax.Array | None = None) -> jax.Array:
        """image_tokens [B, M, C_i] (one reference) or [B, O, M, C_i] (O references); with merge="mip" also
        entity_context [B, O, L, C] (each object's phrase, BOS first, in the text context's width) and
        entity_lengths [B, O] (its tokens after BOS). dense_tokens [B, S_d, dense_dim] when the layer has a dense
        stream. scale / dense_scale override the weights for this call (a literal 0 skips that stream)."""
        self._check_call(image_tokens, entity_context, entity_lengths, dense_tokens)
        query = self._bias(jnp.einsum("btd,dnh->btnh", x, self.query_dnh[...]), self.query_bias_nh)
        key = self._bias(jnp.einsum("bsc,cnh->bsnh", context, self.key_cnh[...]), self.key_bias_nh)
        value = self._bias(jnp.einsum("bsc,cnh->bsnh", context, self.value_cnh[...]), self.value_bias_nh)
        scale = self.scale if scale is None else scale
        extra = []  # (key, value, weight) streams beside the text and (unless MIP) image streams
        if self.dense_key_cnh is not None:
            extra.append((jnp.einsum("bsc,cnh->bsnh", dense_tokens, self.dense_key_cnh[...]),
                          jnp.einsum("bsc,cnh->bsnh", dense_tokens, self.dense_value_cnh[...]),
                          self.dense_scale if dense_scale is None else dense_scale))
        if image_tokens is not None and image_tokens.ndim == 3:
            image_tokens = image_tokens[:, None]  # one reference: [B, 1, M, C_i]
        if image_tokens is None or self.merge == "concat":
            image = {}
            if image_tokens is not None:
                flat = image_tokens.reshape(image_tokens.shape[0], -1, image_tokens.shape[-1])  # [B, O * M, C_i]
                image = dict(image_key=jnp.einsum("bmc,cnh->bmnh", flat, self.image_key_cnh[...]),
                             image_value=jnp.einsum("bmc,cnh->bmnh", flat, self.image_value_cnh[...]), scale=scale)
            mixed = ip_adapter_attention(query, key, value, streams=extra, **image)
        else:
            mixed = self._mip(query, key, value, image_tokens, entity_context, entity_lengths, scale, extra)
        return self._bias(jnp.einsum("btnh,nhd->btd", mixed, self.out_nhd[...]), self.out_bias_d)

    def _mip(self, query, key, value, image_tokens, entity_context, entity_lengths, scale, extra):
        """T + scale * sum_o w_o(t) Attn(q, to_k_ip(image_o), to_v_ip(image_o)) + the extra streams."""
        text = multi_stream_cross_attention(query, [(key, value, 1.0)])
        streams = list(extra)
        if not (isinstance(scale, (int, float)) and scale == 0):  # a literal 0 skips the objects, as in the op
            entity_key = self._bias(jnp.einsum("bolc,cnh->bolnh", entity_context, self.key_cnh[...]),
                                    self.key_bias_nh)
            weights = mip_object_weights(query, entity_key, entity_lengths, text.reshape(*text.shape[:2], -1),
                                         self.text_weight_c[...])  # [B, O, T], gradient-stopped relevance
            image_key = jnp.einsum("bomc,cnh->bomnh", image_tokens, self.image_key_cnh[...])
            image_value = jnp.einsum("bomc,cnh->bomnh", image_tokens, self.image_value_cnh[...])
            streams += [(image_key[:, o], image_value[:, o], scale * weights[:, o])
                        for o in range(image_tokens.shape[1])]
        return text if not streams else text + multi_stream_cross_attention(query, streams)

    def _check_call(self, image_tokens, entity_context, entity_lengths, dense_tokens) -> None:
        name = "DecoupledCrossAttention"
        if (self.image_key_cnh is None) != (image_tokens is None):
            raise ValueError(f"{name}: image_tokens given, but the layer has no image stream" if image_tokens is not
                             None else f"{name}: image_tokens missing: the layer has an image stream (pass the "
                             f"image projection of a zero embedding for none)")
        if (self.dense_key_cnh is None) != (dense_tokens is None):
            raise ValueError(f"{name}: dense_tokens given, but the layer has no dense stream (dense_dim=0)" if
                             dense_tokens is not None else f"{name}: dense_tokens missing: the layer has a dense "
                             f"stream (DPDEdit); pass [B, S_d, dense_dim] (zeros for none)")
        if dense_tokens is not None and (dense_tokens.ndim != 3
                                         or dense_tokens.shape[-1] != self.dense_key_cnh.shape[0]):
            raise ValueError(f"{name}: dense_tokens must be [B, S_d, {self.dense_key_cnh.shape[0]}], got "
                             f"{dense_tokens.shape}")
        if image_tokens is not None and image_tokens.ndim not in (3, 4):
            raise ValueError(f"{name}: image_tokens must be [B, M, C] or [B, O, M, C], got {image_tokens.shape}")
        mip = self.merge == "mip" and image_tokens is not None
        if mip != (entity_context is not None) or mip != (entity_lengths is not None):
            raise ValueError(f"{name}: entity_context [B, O, L, C] and entity_lengths [B, O] are "
                             + ("required by merge='mip' (each reference's entity phrase)" if mip else
                                "only used by merge='mip' with image tokens"))
        if mip:
            objects = image_tokens.shape[1] if image_tokens.ndim == 4 else 1
            if entity_context.ndim != 4 or entity_context.shape[:2] != (image_tokens.shape[0], objects):
                raise ValueError(f"{name}: entity_context must be [B, O, L, C] with B, O = "
                                 f"{(image_tokens.shape[0], objects)} (from image_tokens), got {entity_context.shape}")
