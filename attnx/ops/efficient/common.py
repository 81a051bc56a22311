"""Pieces shared by the CAB efficient attentions: option checks, segment-mean landmarks, grouped-query reshapes and
a LayerNorm over all heads. Pure JAX; shapes follow the attention contract after `canonicalize` (one batch axis).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from attnx.ops.linear.common import resolve_implementation  # re-exported for the family

__all__ = ["HIGHEST", "check_int", "decode_through_full_causal", "group", "layer_norm", "refuse_pattern",
           "resolve_implementation", "segment_matrix", "segment_means"]

HIGHEST = jax.lax.Precision.HIGHEST


def check_int(name: str, value, minimum: int = 1) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{name}: expected an int >= {minimum}, got {value!r}")


def refuse_pattern(name: str, *, causal: bool, T: int, S: int, patterns: str, causal_ok: bool = False,
                   cross_ok: bool = False) -> None:
    """ValueError naming the mechanism's CAB patterns when the call asks for another one."""
    if causal and not causal_ok:
        raise ValueError(f"{name}: causal=True is not supported (CAB patterns {patterns}); use causal=False, or a "
                         f"causal mechanism such as 'softmax' or 'abc'")
    if T != S and not cross_ok:
        raise ValueError(f"{name}: self attention only (CAB patterns {patterns}): query length {T} must equal key "
                         f"length {S}")


def segment_matrix(length: int, segments: int) -> jax.Array:
    """[segments, length] averaging matrix of CAB's segment-mean landmarks (Nystromformer / LARA `_segment`).

    When `segments` does not divide `length`, the code's split is kept: the first `(s + 1) * m - n` segments hold
    s = n // m positions and the rest s + 1, so every position belongs to exactly one segment.
    """
    base = length // segments
    n_short = (base + 1) * segments - length if length % segments else segments
    sizes = [base] * n_short + [base + 1] * (segments - n_short)
    matrix = np.zeros((segments, length), np.float32)
    start = 0
    for row, size in enumerate(sizes):
        matrix[row, start:start + size] = 1.0 / size
        start += size
    return jnp.asarray(matrix)


def segment_means(x: jax.Array, segments: int) -> jax.Array:
    """x [B, L, heads, H] -> [B, segments, heads, H], the segment means (a linear map, so it commutes with scaling)."""
    return jnp.einsum("ml,blnh->bmnh", segment_matrix(x.shape[1], segments), x, precision=HIGHEST)


def group(q: jax.Array, num_kv_heads: int) -> jax.Array:
    """[B, T, N, H] -> [B, T, K, G, H]: query heads grouped by the key/value head they share (GQA, N = K * G)."""
    B, T, N, H = q.shape
    return q.reshape(B, T, num_kv_heads, N // num_kv_heads, H)


def layer_norm(x: jax.Array, scale: jax.Array | None, bias: jax.Array | None, eps: float = 1e-5) -> jax.Array:
    """LayerNorm of x [..., K, H] over its last two axes jointly: one norm over all K * H features, as torch's
    nn.LayerNorm(embed_dim) over concatenated heads in Transformer-LS; scale/bias [K, H] (None: 1 and 0)."""
    mean = jnp.mean(x, axis=(-2, -1), keepdims=True)
    var = jnp.mean(jnp.square(x - mean), axis=(-2, -1), keepdims=True)
    y = (x - mean) * jax.lax.rsqrt(var + eps)
    if scale is not None:
        y = y * scale
    if bias is not None:
        y = y + bias
    return y


def decode_through_full_causal(fn, query, key_cache, value_cache, *, query_positions, **kwargs):
    """The registry decode rule of a mechanism whose causal output at position t reads only q_t and the keys and
    values at positions <= t (ABC's prefix memory, Transformer-LS): the queries are placed at their positions in a
    cache-length query array, the full causal form runs over the cache, and their rows are read back. Cache slots
    after the last query (zeros or stale) cannot reach those rows. O(L) per call, like re-encoding the cache."""
    positions = jnp.asarray(query_positions)
    L = key_cache.shape[-3]
    full = jnp.zeros((*query.shape[:-3], L, *query.shape[-2:]), query.dtype).at[..., positions, :, :].set(query)
    return fn(full, key_cache, value_cache, causal=True, **kwargs)[..., positions, :, :]
