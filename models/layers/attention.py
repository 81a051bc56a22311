"""The NNX attention layer: owns the projections and calls a pure attention function from `attnx` by name.

Layout follows the attnx contract (ARCHITECTURE §4): query [B, T, N, H], key/value [B, S, K, H]. Grouped-query
attention (K < N) is passed through as is; key/value heads are never repeated here.
"""

from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
from flax import nnx

import attnx
from models.layers.rope import rotary_embedding


def resolve_attention(kind: str, *, causal: bool) -> Callable[..., jax.Array]:
    """Returns `fn(query, key, value, **kwargs)` for the mechanism registered under `kind` in attnx.

    Unknown names raise the registry's ValueError, which lists the known ones; a mechanism that does not support
    self attention with the requested causality (CAB pattern "CS" or "NS") is rejected here, at construction.
    "softmax" calls `attnx.dot_product_attention` directly with `attnx.Mask(causal=...)`.
    """
    spec = attnx.get_attention(kind)
    pattern = "CS" if causal else "NS"
    if not spec.supports(pattern):
        raise ValueError(f"attention {kind!r} does not support {'causal' if causal else 'non-causal'} self "
                         f"attention (pattern {pattern}); it supports {sorted(spec.patterns)}")
    if spec.name == "softmax":
        mask = attnx.Mask(causal=causal)
        return lambda query, key, value, **kwargs: attnx.dot_product_attention(query, key, value, mask=mask, **kwargs)
    return lambda query, key, value, **kwargs: spec.fn(query, key, value, causal=causal, **kwargs)


class Attention(nnx.Module):
    """Multi-head self-attention with rotary positions, grouped-query heads, and a pluggable mixer `kind`.

    `kind_kwargs` are forwarded to the attention function on every call (e.g. `{"logits_soft_cap": 30.0}`).
    """

    def __init__(
        self,
        width: int,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        *,
        kind: str = "softmax",
        kind_kwargs: Mapping[str, Any] | None = None,
        causal: bool = True,
        rope_theta: float = 10_000.0,
        rngs: nnx.Rngs,
        param_dtype=jnp.float32,
    ):
        if num_heads % num_kv_heads:
            raise ValueError(f"num_heads={num_heads} must be a multiple of num_kv_heads={num_kv_heads}")
        resolve_attention(kind, causal=causal)  # fail at construction, not at the first call
        self.kind = kind
        # Stored as sorted pairs: module attributes are static graph metadata and must be hashable for jit.
        self.kind_kwargs = tuple(sorted(dict(kind_kwargs or {}).items()))
        self.causal = causal
        self.rope_theta = rope_theta
        in_init = nnx.initializers.variance_scaling(1.0, "fan_in", "truncated_normal", in_axis=0, out_axis=(1, 2))
        out_init = nnx.initializers.variance_scaling(1.0, "fan_in", "truncated_normal", in_axis=(0, 1), out_axis=2)
        self.query_dnh = nnx.Param(in_init(rngs.params(), (width, num_heads, head_dim), param_dtype))
        self.key_dkh = nnx.Param(in_init(rngs.params(), (width, num_kv_heads, head_dim), param_dtype))
        self.value_dkh = nnx.Param(in_init(rngs.params(), (width, num_kv_heads, head_dim), param_dtype))
        self.out_nhd = nnx.Param(out_init(rngs.params(), (num_heads, head_dim, width), param_dtype))

    def __call__(self, x: jax.Array, positions: jax.Array | None = None) -> jax.Array:
        """x [B, T, D] -> [B, T, D]; `positions` [B, T] or [T] default to 0..T-1."""
        if positions is None:
            positions = jnp.arange(x.shape[1])
        query = jnp.einsum("btd,dnh->btnh", x, self.query_dnh[...])
        key = jnp.einsum("bsd,dkh->bskh", x, self.key_dkh[...])
        value = jnp.einsum("bsd,dkh->bskh", x, self.value_dkh[...])
        query = rotary_embedding(query, positions, theta=self.rope_theta)
        key = rotary_embedding(key, positions, theta=self.rope_theta)
        attention_fn = resolve_attention(self.kind, causal=self.causal)  # by name: keeps the graph def hashable
        mixed = attention_fn(query, key, value, **dict(self.kind_kwargs))
        return jnp.einsum("btnh,nhd->btd", mixed, self.out_nhd[...])
