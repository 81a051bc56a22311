"""GAAM composed with dot-product attention: Gaussian re-weighting of the values, then softmax attention.

The paper (arXiv 2401.11143, §3, "compatibility with dot-product-based attention") presents GAAM as a feature
re-weighting that slots in beside dot-product attention rather than a QK mechanism of its own. Here it re-weights
the values of each key/value head, one GAAM head per attention head (the code's per-chunk delta/c become per-head
parameters delta, c [K, G]), then the values go through softmax attention:

    v' = v + GAAM(v)   (residual, as one layer of the code's GaussianBlock; residual=False gives v' = GAAM(v))
    out = softmax_attention(q, k, v')

axis="sequence" takes the statistics over the key/value positions of each channel (the README's norm_axis=1 on
[B, T, D] inputs), with prefix statistics when causal (see gaam.py); axis="feature" takes them over the value
features of each token, which is causal by construction.

Patterns: all four. The catalogue lists NS, CS because GAAM itself maps one sequence to itself; composed this way
only the values are re-weighted, which needs nothing from the queries, so cross attention works as well, and
causal cross attention (query t sees keys 0..t) sees values whose statistics stop at their own position.
"""

from __future__ import annotations

from typing import Literal

import jax.numpy as jnp

from attnx.ops.builtin import softmax_attention, softmax_decode
from attnx.ops.gaussian.gaam import EPS, _check_params, gaussian_weights

AXES = ("sequence", "feature")


def default_params(num_kv_heads: int, num_gaussians: int):
    """delta = 0 (the code's init) and c = 1 (a deterministic stand-in for the code's exp(randn) init)."""
    return jnp.zeros((num_kv_heads, num_gaussians), jnp.float32), jnp.ones((num_kv_heads, num_gaussians), jnp.float32)


def reweight_values(value, delta=None, c=None, *, causal: bool = False, num_gaussians: int = 4,
                    axis: Literal["sequence", "feature"] = "sequence", residual: bool = True, eps: float = EPS):
    """value [*B, S, K, V] -> v' like value; delta, c [K, G] (None: default_params)."""
    if axis not in AXES:
        raise ValueError(f"gaam.axis: expected one of {AXES}, got {axis!r}")
    if not isinstance(num_gaussians, int) or isinstance(num_gaussians, bool) or num_gaussians < 1:
        raise ValueError(f"gaam.num_gaussians: expected a positive int, got {num_gaussians!r}")
    num_kv_heads = value.shape[-2]
    if delta is None and c is None:
        delta, c = default_params(num_kv_heads, num_gaussians)
    elif delta is None or c is None:
        raise ValueError("gaam: give both delta and c (the mixer models/layers/mixers/gaam.py owns them) or neither")
    delta, c = _check_params(delta, c, "gaam")
    if delta.shape[0] != num_kv_heads or delta.ndim != 2:
        raise ValueError(f"gaam.delta/c: expected shape [K={num_kv_heads}, G], got {delta.shape}")
    if axis == "sequence":
        v = jnp.moveaxis(value, -3, -1)  # [*B, K, V, S]
        y, _ = gaussian_weights(v, delta[:, None, :], c[:, None, :], eps=eps, causal=causal)
        y = jnp.moveaxis(y, -1, -3)
    else:  # per token: the statistics never look at another position
        y, _ = gaussian_weights(value, delta, c, eps=eps)
    return (value + y if residual else y).astype(value.dtype)


def gaam_attention(query, key, value, *, causal: bool = False, delta=None, c=None, num_gaussians: int = 4,
                   axis: Literal["sequence", "feature"] = "sequence", residual: bool = True, eps: float = EPS,
                   **kwargs):
    """Softmax attention over GAAM-re-weighted values (module docstring). kwargs go to softmax attention
    (mask, bias, scale, implementation, ...)."""
    v = reweight_values(value, delta, c, causal=causal, num_gaussians=num_gaussians, axis=axis, residual=residual,
                        eps=eps)
    return softmax_attention(query, key, v, causal=causal, **kwargs)


def gaam_attention_reference(query, key, value, **kwargs):
    return gaam_attention(query, key, value, implementation="reference", **kwargs)


def gaam_decode(query, key_cache, value_cache, *, query_positions, delta=None, c=None, num_gaussians: int = 4,
                axis: Literal["sequence", "feature"] = "sequence", residual: bool = True, eps: float = EPS,
                **kwargs):
    """Decode over a KV cache: the causal re-weighting of the cached values (slot j's statistics stop at j, so the
    empty slots after the last written one never reach a visible value), then softmax decode."""
    v = reweight_values(value_cache, delta, c, causal=True, num_gaussians=num_gaussians, axis=axis,
                        residual=residual, eps=eps)
    return softmax_decode(query, key_cache, v, query_positions=query_positions, **kwargs)
