"""Sigma's differentially compressed K and V heads: attention with independent key and value head counts.

Lin et al., 2025, "Sigma: Differential Rescaling of Query, Key and Value for Efficient Language Models", arXiv
2501.13629, §2 (DiffQKV) and App. B. No official code was found (spec llm_mechanisms.md §5); this follows the paper.

Query head i reads key head floor(i·Kk/N) and, independently, value head floor(i·Kv/N):

    o_i = softmax(q_i K_{gk(i)}ᵀ / sqrt(H)) V_{gv(i)}.

Kk = Kv is ordinary GQA, Kk = Kv = N is MHA. Sigma-1.5B uses N=32, Kk=4, Kv=16, so its KV cache holds 20 heads per
token where GQA-16 holds 32 (a 37.5% cut).

How it runs here: both head maps are floor maps onto divisors of N, so both factor through L = lcm(Kk, Kv) "virtual"
heads (query i -> virtual i // (N/L) -> key virtual // (L/Kk), value virtual // (L/Kv)). Repeating the smaller of K
and V up to L heads turns the call into plain GQA with L key/value heads, and every softmax implementation (chunked
flash included) applies unchanged. The repeat is of the compressed tensor only and happens at compute time; caches
keep the separate [*B, S, Kk, H] and [*B, S, Kv, V] arrays. A Pallas kernel can instead give K and V separate head
index maps (FlexHeadFA's "address probing"), which avoids the repeat; that is the kernels' issue.
"""

from __future__ import annotations

import math

import jax.numpy as jnp

from attnx.api import dot_product_attention
from attnx.mask import Mask


def head_maps(num_heads: int, num_key_heads: int, num_value_heads: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(key head of each query head, value head of each query head), Sigma's floor(i·K/N) maps."""
    check_head_counts(num_heads, num_key_heads, num_value_heads)
    return (tuple(i * num_key_heads // num_heads for i in range(num_heads)),
            tuple(i * num_value_heads // num_heads for i in range(num_heads)))


def check_head_counts(num_heads: int, num_key_heads: int, num_value_heads: int) -> None:
    for name, count in (("key", num_key_heads), ("value", num_value_heads)):
        if count < 1 or num_heads % count:
            raise ValueError(f"diffqkv: the number of {name} heads ({count}) must divide the number of query heads "
                             f"({num_heads}); allowed: {[d for d in range(1, num_heads + 1) if num_heads % d == 0]}")


def _repeat_heads(x, target: int):
    return x if x.shape[-2] == target else jnp.repeat(x, target // x.shape[-2], axis=-2)


def flexhead_attention(query, key, value, *, causal: bool = False, mask: Mask | None = None, bias=None,
                       **kwargs):
    """Softmax attention with query [*B, T, N, H], key [*B, S, Kk, H], value [*B, S, Kv, V], where Kk and Kv each
    divide N independently (Sigma's DiffQKV). All four CAB patterns; the rest of `attnx.dot_product_attention`'s
    arguments (mask, bias, implementation, sinks, ...) pass through."""
    num_heads, num_key_heads, num_value_heads = query.shape[-2], key.shape[-2], value.shape[-2]
    check_head_counts(num_heads, num_key_heads, num_value_heads)
    if key.shape[:-2] != value.shape[:-2]:
        raise ValueError(f"diffqkv: key {key.shape} and value {value.shape} must agree on batch and length "
                         f"(only the head counts and head sizes may differ)")
    shared = math.lcm(num_key_heads, num_value_heads)
    m = Mask(causal=causal)
    if mask is not None:
        m = m & mask
    return dot_product_attention(query, _repeat_heads(key, shared), _repeat_heads(value, shared), bias, m, **kwargs)


def flexhead_reference(query, key, value, *, causal: bool = False, mask: Mask | None = None, bias=None, **kwargs):
    """The oracle: both K and V expanded to one head per query head through the explicit index maps."""
    key_map, value_map = head_maps(query.shape[-2], key.shape[-2], value.shape[-2])
    m = Mask(causal=causal)
    if mask is not None:
        m = m & mask
    return dot_product_attention(query, jnp.take(key, jnp.asarray(key_map), axis=-2),
                                 jnp.take(value, jnp.asarray(value_map), axis=-2), bias, m,
                                 **{**kwargs, "implementation": "reference"})


def flexhead_decode(query, key_cache, value_cache, *, query_positions, mask: Mask | None = None, **kwargs):
    """Causal decode over separate key [*B, L, Kk, H] and value [*B, L, Kv, V] caches (slot j = position j)."""
    allowed = jnp.arange(key_cache.shape[-3])[None, :] <= jnp.asarray(query_positions)[:, None]
    m = Mask(dense=allowed)
    return flexhead_attention(query, key_cache, value_cache, mask=m if mask is None else m & mask, **kwargs)
