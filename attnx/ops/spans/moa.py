"""MoA's heterogeneous sink + window attention (Fu et al., 2024, "MoA: Mixture of Sparse Attention for Automatic
Large Language Model Compression", arXiv 2406.14909 (v3 retitled "Mixture of Attention Spans: Optimizing LLM Inference
Efficiency with Heterogeneous Sliding-Window Lengths"), method sections on the heterogeneous elastic rules (search
space); section numbers differ between versions, so sections are cited by subject; official code thu-nics/MoA).

Each head h keeps the first `sink` tokens (the paper's G = 64 "global" tokens) and a band of the `spans[h]` most
recent tokens:

    query i sees key j  iff  j <= i  and  (j < sink  or  i - j < spans[h])

so a query past the first sink + span positions attends to sink + span keys. Spans differ per head and grow with the
input length N as S_h(N) = alpha_h + beta_h * N (`moa_spans`); they are static here (a tuple in attention_kwargs),
computed offline for the length a model serves (the profiling/selection tools are in `attnx.analysis.influence`).

Paper vs code (we follow the function the brief specifies and say where the code differs):
- The runtime cache of the official code (`MoA/attention/cache_utils.py::moa_config_to_cache_config`) holds
  int(alpha + beta * N) tokens *including* the min(cache, 64) sink tokens, rounded up to a multiple of 64 with a
  floor of 128; the paper and spec count G + S_h. `moa_spans` returns the spec's S_h (the code's int truncation and
  clip to N); pass `span - sink` if you import a plan sized by the code's accounting.
- The code converts GQA models to MHA first; here GQA is kept: heads with equal spans are gathered into one call
  (MoA permutes heads for the same reason) and reuse their key/value heads without repeating them when every key
  head contributes equally many query heads to the group; otherwise that group's key/value heads are gathered per
  query head (documented cost, never silent).
- The per-head ring-buffer cache of the official decode kernel is not written: `sink_window_decode` reads a full
  cache (slot j = position j, the registry's decode contract) with a per-head mask, which gives the same outputs.

Fast path: one `attnx.dot_product_attention` per span group, with `Mask(causal=True)` and a `mask_mod` for the
sink-or-band rule; the chunked implementation skips key blocks the rule leaves empty for every head of the group
(`Mask.window` alone cannot say "band OR sink"). With sink=0 the group is a plain causal window, whose key-block range
is static. The reference materialises the per-head [N, T, S] mask and runs the reference softmax.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from attnx.api import dot_product_attention
from attnx.mask import Mask

__all__ = ["moa_spans", "moa_cache_sizes", "sink_window_mask", "sink_window_attention", "sink_window_reference",
           "sink_window_decode"]


def _int(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"moa_span.{name}: expected an int >= {minimum}, got {value!r}")
    return int(value)


def _check_spans(spans: Any, num_heads: int) -> tuple[int, ...]:
    """spans: one int for every head, or a sequence of N ints >= 1 (static: they decide the block structure)."""
    if isinstance(spans, (int, np.integer)) and not isinstance(spans, bool):
        spans = (spans,) * num_heads
    if not isinstance(spans, (tuple, list)) or not spans:
        raise ValueError(f"moa_span.spans: expected an int or a tuple of {num_heads} ints (one per query head), "
                         f"got {spans!r}")
    if len(spans) != num_heads:
        raise ValueError(f"moa_span.spans: expected {num_heads} spans (one per query head), got {len(spans)}: "
                         f"{tuple(spans)!r}")
    return tuple(_int("spans", s, 1) for s in spans)


def moa_spans(alpha: Sequence[float], beta: Sequence[float], length: int) -> tuple[int, ...]:
    """Per-head spans S_h = alpha_h + beta_h * length (MoA's elastic rule), truncated to int and clipped to
    [1, length] as the official cache sizing does (alpha may be negative; the plan grid only keeps configurations
    with S_h > 0 at the shortest length)."""
    length = _int("length", length, 1)
    alpha, beta = np.atleast_1d(np.asarray(alpha, np.float64)), np.atleast_1d(np.asarray(beta, np.float64))
    if alpha.shape != beta.shape or alpha.ndim != 1:
        raise ValueError(f"moa_spans: alpha and beta must be 1-D of equal length (one per head), got shapes "
                         f"{alpha.shape} and {beta.shape}")
    return tuple(int(min(max(math.trunc(a + b * length), 1), length)) for a, b in zip(alpha, beta))


def moa_cache_sizes(spans: Sequence[int], sink: int, length: int) -> tuple[int, ...]:
    """Keys held per head for a query at position length - 1: min(length, sink + S_h). Their sum is the per-layer
    cache size sum_h (G + S_h) of the spec once length >= G + S_h."""
    return tuple(min(length, sink + s) for s in spans)


def sink_window_mask(spans: Sequence[int], sink: int, query_positions, key_length: int) -> jax.Array:
    """bool [N, T, L]: query at absolute position p sees key j iff j <= p and (j < sink or p - j < spans[h])."""
    p = jnp.asarray(query_positions)[None, :, None]
    j = jnp.arange(key_length)[None, None, :]
    span = jnp.asarray(spans, jnp.int32)[:, None, None]
    return (j <= p) & ((j < sink) | (p - j < span))


def _validate(query, key, spans, sink, causal):
    if not causal:
        raise ValueError("moa_span: causal=False is not supported; the sink+window rule is defined on causal self "
                         "attention (pattern CS only)")
    T, S = query.shape[-3], key.shape[-3]
    if T != S:
        raise ValueError(f"moa_span: self attention only (pattern CS), got query length {T} and key length {S}")
    return _check_spans(spans, query.shape[-2]), _int("sink", sink, 0)


def _group_rule(span: int, sink: int, length: int):
    """(Mask, mask_mod) for one span group: dense causal when the band or the sink covers the sequence, a static
    causal window when there is no sink, otherwise causal plus the sink-or-band rule."""
    if span >= length or sink >= length:
        return Mask(causal=True), None
    if sink == 0:
        return Mask(causal=True, window=(span - 1, 0)), None
    return Mask(causal=True), lambda b, n, t, s: (s < sink) | (t - s < span)


def _groups(spans: tuple[int, ...], num_kv_heads: int):
    """[(span, query heads, key heads or None for 'gather one per query head')] with query heads ascending."""
    G = len(spans) // num_kv_heads
    out = []
    for span in sorted(set(spans)):
        heads = tuple(n for n, s in enumerate(spans) if s == span)
        kv = [n // G for n in heads]
        counts = {h: kv.count(h) for h in kv}
        # Ascending query heads put each key head's queries next to each other, so the group is itself a valid GQA
        # layout exactly when every key head carries the same number of them.
        shared = len(set(counts.values())) == 1
        out.append((span, heads, tuple(sorted(counts)) if shared else None))
    return out


def sink_window_attention(query, key, value, *, spans, sink: int = 64, causal: bool = True,
                          implementation: Any = None):
    """MoA sink + per-head window attention (see the module docstring).

    Args:
      query [*B, T, N, H], key [*B, T, K, H], value [*B, T, K, V]: causal self attention, K divides N.
      spans: an int or N ints >= 1, the band width S_h of each query head (static).
      sink: the G first tokens every head keeps (64 in the paper); 0 gives a plain causal sliding window.
      causal: must be True (pattern CS).
      implementation: forwarded to `attnx.dot_product_attention` for every span group ("chunked" skips dead blocks).

    Returns: [*B, T, N, V].
    """
    spans, sink = _validate(query, key, spans, sink, causal)
    T, N, K = query.shape[-3], query.shape[-2], key.shape[-2]
    groups = _groups(spans, K)
    outs, order = [], []
    for span, heads, kv_heads in groups:
        mask, mask_mod = _group_rule(span, sink, T)
        if len(groups) == 1:
            q_g, k_g, v_g = query, key, value
        else:
            q_g = jnp.take(query, np.asarray(heads), axis=-2)
            kv_idx = np.asarray(kv_heads if kv_heads is not None else [n // (N // K) for n in heads])
            k_g, v_g = jnp.take(key, kv_idx, axis=-2), jnp.take(value, kv_idx, axis=-2)
        outs.append(dot_product_attention(q_g, k_g, v_g, mask=mask, mask_mod=mask_mod,
                                          implementation=implementation))
        order.extend(heads)
    if len(outs) == 1:
        return outs[0]
    return jnp.take(jnp.concatenate(outs, axis=-2), np.argsort(np.asarray(order)), axis=-2)


def sink_window_reference(query, key, value, *, spans, sink: int = 64, causal: bool = True, **unused):
    """The oracle: the materialised per-head mask through the reference softmax."""
    spans, sink = _validate(query, key, spans, sink, causal)
    T = query.shape[-3]
    dense = sink_window_mask(spans, sink, jnp.arange(T), T)
    return dot_product_attention(query, key, value, mask=Mask(dense=dense), implementation="reference")


def sink_window_decode(query, key_cache, value_cache, *, query_positions, spans, sink: int = 64,
                       implementation: Any = None):
    """Cached decode: queries at absolute `query_positions` [T] over a cache whose slot j holds position j; each
    head reads its sink and its band (equal to the last rows of the full causal forward)."""
    spans = _check_spans(spans, query.shape[-2])
    sink = _int("sink", sink, 0)
    dense = sink_window_mask(spans, sink, query_positions, key_cache.shape[-3])
    return dot_product_attention(query, key_cache, value_cache, mask=Mask(dense=dense),
                                 implementation=implementation)
