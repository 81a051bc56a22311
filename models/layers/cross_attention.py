"""Condition ("text") cross-attention of the DiT, PixArt-α style (Chen, Yu, Ge, Yao, Xie, Wu, Wang, Kwok, Luo, Lu,
Li, 2023, "PixArt-α: Fast Training of Diffusion Transformer for Photorealistic Text-to-Image Synthesis", arXiv
2310.00426, §2.3 "Efficient T2I Transformer" and Fig. 4; official code PixArt-alpha/PixArt-alpha
`diffusion/model/nets/PixArt.py` (PixArtBlock, initialize_weights) and `PixArt_blocks.py` (MultiHeadCrossAttention,
CaptionEmbedder)).

PixArt-α adds one cross-attention sub-layer to every DiT block, between the self-attention and the MLP:

    x = x + gate_msa * SelfAttn(modulate(LN(x)))
    x = x + CrossAttn(x, y)                         # queries from x itself (no norm, no adaLN), keys/values from y
    x = x + gate_mlp * MLP(modulate(LN(x)))

where y [B, S, D] is the caption (T5) encoding [B, S, C] projected to the width once per model by the caption
embedder (Linear(C, D) -> GELU-tanh -> Linear(D, D), weights N(0, 0.02²)), and the cross-attention's output projection
starts at zero (its initialize_weights), so each block is still the identity at initialisation (adaLN-Zero).

- `CaptionProjection`: the caption embedder's projection (its classifier-free dropout to a learned null caption is
  the caller's here: the digits stand-in below has a null row instead).
- `LabelTokens`: the condition sequence of the class-conditional digits DiT, which has no text encoder: `shared`
  learned tokens common to every image (like BOS / style words) followed by `per_class` learned tokens of the
  example's class (the "subject words"), a row per class plus a null row for classifier-free guidance. A stand-in,
  not a text encoder: it lets the cross-attention mechanisms run and train on the digits.
- `ConditionCrossAttention`: the sub-layer. Its mechanism is any registered attention that supports non-causal
  cross attention (CAB pattern "NC"), chosen by name: plain `softmax` (PixArt-α), or the attention-control entries
  `structured_cross`, `region_mask`, `isolation` (attnx/ops/control), whose per-call inputs (noun-phrase contexts,
  foreground mask and subject tokens, subject ids) the caller passes on every call. Structured Diffusion Guidance's
  noun-phrase encodings are contexts, not values: pass them as `extra_contexts` [M, B, S, D] (already projected to
  the width) and the layer projects them with its own W_V (mode 'default': extra value sets) or W_K (mode
  'conjunction': extra key sets), as the official multi_qkv does with to_v / to_k.
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp
from flax import nnx

import attnx

PIXART_PROJECTION_STD = 0.02  # initialize_weights: normal_(y_embedder.y_proj.fc1/fc2.weight, std=0.02)


def check_cross_attention_choice(owner: str, attention: str, attention_kwargs: Any) -> None:
    """A cross-attention mechanism must exist and support non-causal cross attention (pattern NC)."""
    if not isinstance(attention_kwargs, Mapping):
        raise ValueError(f"{owner}.cross_attention_kwargs must be a dict, got {attention_kwargs!r}")
    try:
        spec = attnx.get_attention(attention)
    except (ValueError, KeyError) as error:
        raise ValueError(f"{owner}.cross_attention={attention!r}: {error}") from error
    if not spec.supports("NC"):
        supporting = sorted(name for name in attnx.list_attentions() if attnx.get_attention(name).supports("NC"))
        raise ValueError(f"{owner}.cross_attention={attention!r} does not support non-causal cross attention "
                         f"(pattern NC); it supports {sorted(spec.patterns)}. Mechanisms that do: {supporting}")


class CaptionProjection(nnx.Module):
    """context [B, S, C] -> [B, S, D]: Linear(C, D) -> GELU-tanh -> Linear(D, D), PixArt's caption embedder."""

    def __init__(self, context_dim: int, width: int, *, rngs: nnx.Rngs, param_dtype=jnp.float32):
        init = nnx.initializers.normal(PIXART_PROJECTION_STD)
        self.fc1_cd = nnx.Param(init(rngs.params(), (context_dim, width), param_dtype))
        self.fc1_bias_d = nnx.Param(jnp.zeros((width,), param_dtype))
        self.fc2_dd = nnx.Param(init(rngs.params(), (width, width), param_dtype))
        self.fc2_bias_d = nnx.Param(jnp.zeros((width,), param_dtype))

    def __call__(self, context: jax.Array) -> jax.Array:
        if context.shape[-1] != self.fc1_cd.shape[0]:
            raise ValueError(f"CaptionProjection: condition tokens must have width {self.fc1_cd.shape[0]} "
                             f"(DiTConfig.condition_dim), got shape {context.shape}")
        hidden = jnp.einsum("...c,cd->...d", context, self.fc1_cd[...]) + self.fc1_bias_d[...]
        hidden = jax.nn.gelu(hidden, approximate=True)
        return jnp.einsum("...d,de->...e", hidden, self.fc2_dd[...]) + self.fc2_bias_d[...]


class LabelTokens(nnx.Module):
    """labels [B] (row num_classes = null) -> condition tokens [B, shared + per_class, C]: the shared tokens, then
    the class's own. Unit-variance rows (the scale of a normalised encoder output)."""

    def __init__(self, num_classes: int, context_dim: int, *, shared: int, per_class: int, rngs: nnx.Rngs,
                 param_dtype=jnp.float32):
        if per_class < 1 or shared < 0:
            raise ValueError(f"LabelTokens: per_class must be >= 1 and shared >= 0, got {per_class}, {shared}")
        init = nnx.initializers.normal(1.0)
        self.shared_sc = nnx.Param(init(rngs.params(), (shared, context_dim), param_dtype)) if shared else None
        self.class_vsc = nnx.Param(init(rngs.params(), (num_classes + 1, per_class, context_dim), param_dtype))

    @property
    def length(self) -> int:
        shared = 0 if self.shared_sc is None else self.shared_sc.shape[0]
        return shared + self.class_vsc.shape[1]

    def subject_tokens(self) -> jax.Array:
        """[S] bool, True on the class tokens (the "subject words" that region_mask confines to a region)."""
        shared = self.length - self.class_vsc.shape[1]
        return jnp.arange(self.length) >= shared

    def __call__(self, labels: jax.Array) -> jax.Array:
        tokens = jnp.take(self.class_vsc[...], labels, axis=0)  # [B, per_class, C]
        if self.shared_sc is None:
            return tokens
        shared = jnp.broadcast_to(self.shared_sc[...], (labels.shape[0], *self.shared_sc.shape))
        return jnp.concatenate([shared, tokens], axis=1)


class ConditionCrossAttention(nnx.Module):
    """x [B, T, D] (image tokens), condition [B, S, D] -> [B, T, D]: to_out(fn(to_q(x), to_k(y), to_v(y))).

    kind: a registered mechanism supporting pattern NC; kind_kwargs: its fixed options (e.g. structured_cross's
    mode); the call's keyword arguments are its per-call inputs. Biases on every projection and a zero output
    projection, as PixArt's MultiHeadCrossAttention (nn.Linear) and initialize_weights.
    """

    def __init__(self, width: int, num_heads: int, *, kind: str = "softmax",
                 kind_kwargs: Mapping[str, Any] | None = None, rngs: nnx.Rngs, param_dtype=jnp.float32):
        if width % num_heads:
            raise ValueError(f"ConditionCrossAttention: width={width} is not divisible by num_heads={num_heads}")
        kind_kwargs = dict(kind_kwargs or {})
        check_cross_attention_choice("ConditionCrossAttention", kind, kind_kwargs)
        self.kind = kind  # the registry name (configs test, model summaries)
        self.kind_kwargs = tuple(sorted(kind_kwargs.items()))  # hashable: static graph metadata under jit
        head_dim = width // num_heads
        # PixArt's q_linear / kv_linear / proj are nn.Linear layers re-initialised Xavier-uniform by its
        # _basic_init; the fused kv_linear's bound is that of the [D, 2D] matrix.
        xavier = nnx.initializers.xavier_uniform()
        self.query_dnh = nnx.Param(xavier(rngs.params(), (width, width), param_dtype).reshape(
            width, num_heads, head_dim))
        kv = xavier(rngs.params(), (width, 2 * width), param_dtype).reshape(width, 2, num_heads, head_dim)
        self.key_dnh, self.value_dnh = nnx.Param(kv[:, 0]), nnx.Param(kv[:, 1])
        self.out_nhd = nnx.Param(jnp.zeros((num_heads, head_dim, width), param_dtype))
        zeros = lambda *shape: nnx.Param(jnp.zeros(shape, param_dtype))  # noqa: E731
        self.query_bias_nh, self.key_bias_nh = zeros(num_heads, head_dim), zeros(num_heads, head_dim)
        self.value_bias_nh, self.out_bias_d = zeros(num_heads, head_dim), zeros(width)

    def project_context(self, context: jax.Array, which: str) -> jax.Array:
        """condition [..., S, D] -> keys or values [..., S, N, H] (biased)."""
        weight, bias = (self.key_dnh, self.key_bias_nh) if which == "key" else (self.value_dnh, self.value_bias_nh)
        return jnp.einsum("...sd,dnh->...snh", context, weight[...]) + bias[...]

    def __call__(self, x: jax.Array, condition: jax.Array, **call_kwargs) -> jax.Array:
        if condition.ndim != 3 or condition.shape[0] != x.shape[0] or condition.shape[-1] != x.shape[-1]:
            raise ValueError(f"ConditionCrossAttention: condition must be [B, S, D] = [{x.shape[0]}, S, "
                             f"{x.shape[-1]}] (projected to the width), got {condition.shape}")
        kwargs = dict(self.kind_kwargs)
        extra = call_kwargs.pop("extra_contexts", None)
        if extra is not None:
            if attnx.get_attention(self.kind).name != "structured_cross":
                raise ValueError(f"extra_contexts: only cross attention 'structured_cross' reads extra contexts "
                                 f"(noun-phrase encodings), this layer is {self.kind!r}")
            if jnp.ndim(extra) != 4 or jnp.shape(extra)[1:] != condition.shape:
                raise ValueError(f"extra_contexts: expected [M, B, S, D] with [B, S, D] = {condition.shape}, got "
                                 f"{jnp.shape(extra)}")
            conjunction = kwargs.get("mode", "default") == "conjunction"
            call_kwargs["extra_keys" if conjunction else "extra_values"] = self.project_context(
                extra, "key" if conjunction else "value")
        overlap = set(call_kwargs) & set(kwargs)
        if overlap:
            raise ValueError(f"ConditionCrossAttention: per-call kwargs {sorted(overlap)} are already fixed by "
                             f"cross_attention_kwargs {dict(self.kind_kwargs)}")
        query = jnp.einsum("btd,dnh->btnh", x, self.query_dnh[...]) + self.query_bias_nh[...]
        key, value = self.project_context(condition, "key"), self.project_context(condition, "value")
        fn = attnx.get_attention(self.kind).fn
        mixed = fn(query, key, value, causal=False, **kwargs, **call_kwargs)
        return jnp.einsum("btnh,nhd->btd", mixed, self.out_nhd[...]) + self.out_bias_d[...]
