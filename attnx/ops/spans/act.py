"""Softmax attention with ACT calibration on selected heads (Yu et al., 2024, "Unveiling and Harnessing Hidden
Attention Sinks: Training-Free Attention Calibration for Large Language Models", arXiv 2406.15765, ACT section;
official code GATECH-EIC/ACT `models/llama_modelling_aug.py`). The calibration rule is `attnx.analysis.calibration`.

Materialised on purpose: ACT edits post-softmax probabilities with a sink set chosen from column statistics of the
whole map, so both paths here form the [B, N, T, T] probabilities (O(T^2) memory). `act_attention` computes the
output in the flash-epilogue form (two accumulators, sink columns and the rest, combined by `act_flash_epilogue`),
the form a fused kernel would use; `act_reference` rewrites the map explicitly (`act_calibrate`) and multiplies by
the values. Pattern CS only: the official rule is defined on causal self-attention maps.

statistics: "prefix" (default here) takes row i's sink statistics from rows <= i, so the mechanism is causal (CAB
CS) and can train and run inside an LLM; "full" is the official rule (one sink set per map, from all rows), for
evaluating whole prompts as the paper does: with it, earlier outputs change when later tokens are appended.

Decoding (statistics "prefix" only; a registry CacheRule): a row's sink set needs the attention that earlier
*queries* paid to each column, which a KV cache does not keep; with prefix statistics that is a running column sum
per query head, sum_{r < i} A_rj, kept beside the keys and values (`act_cache_init`, `act_cache_decode`), so each new
row costs O(L) extra state per head and equals the full forward's row. The cache is sized by `head_mask` (one bool per
query head, what `act_layer_attention` entries carry); without it the cache cannot know the number of query heads
and decoding is refused.
"""

from __future__ import annotations

from typing import Any, Literal

import jax
import jax.numpy as jnp

from attnx.analysis.calibration import (_first_hit_removed, act_calibrate, act_flash_epilogue, act_sink_set,
                                        check_act_options, head_mask_array)
from attnx.rotary import rotary_embedding
from attnx.validation import canonicalize

HIGHEST = jax.lax.Precision.HIGHEST
F32 = jnp.float32


def _prepare(query, key, value, causal: bool, scale):
    """Canonical arguments and the float32 causal softmax maps [B, N, T, T] (heads n = k * G + g)."""
    if not causal:
        raise ValueError("act: causal=False is not supported; ACT calibrates causal self-attention maps "
                         "(pattern CS only)")
    if query.shape[-3] != key.shape[-3]:
        raise ValueError(f"act: self attention only (pattern CS), got query length {query.shape[-3]} and key "
                         f"length {key.shape[-3]}")
    args = canonicalize(query, key, value, scale=scale)
    B, T, N, H = args.q.shape
    K = args.k.shape[2]
    qg = jnp.moveaxis(args.q.astype(F32).reshape(B, T, K, N // K, H), 1, 3)  # [B, K, G, T, H]
    logits = jnp.einsum("bkgth,bskh->bkgts", qg, args.k.astype(F32), precision=HIGHEST) * args.scale
    probs = jax.nn.softmax(jnp.where(jnp.tril(jnp.ones((T, T), bool)), logits, -jnp.inf), axis=-1)
    return args, probs.reshape(B, N, T, T)


def _apply(args, maps):
    """maps [B, N, T, S] times the values [B, S, K, V] without repeating key/value heads -> float32 [B, N, T, V]."""
    B, N, T, S = maps.shape
    K = args.v.shape[2]
    out = jnp.einsum("bkgts,bskv->bkgtv", maps.reshape(B, K, N // K, T, S), args.v.astype(F32), precision=HIGHEST)
    return out.reshape(B, N, T, -1)


def _output(args, out):
    """float32 [B, N, T, V] -> [*B, T, N, V] in the query's dtype."""
    out = jnp.moveaxis(out, 1, 2).astype(args.q.dtype)
    return out.reshape(args.batch_shape + out.shape[1:])


def act_attention(query, key, value, *, causal: bool = False, head_mask=None, beta: float = 0.4, tau: float = 0.1,
                  statistics: Literal["full", "prefix"] = "prefix", scale: float | None = None,
                  implementation: Any = None):
    """query [*B, T, N, H], key [*B, T, K, H], value [*B, T, K, V] -> [*B, T, N, V]: causal softmax attention whose
    maps are calibrated by ACT on the heads where `head_mask` (N booleans, static; None = every head) is True.

    beta, tau: ACT's sink keep-ratio and detection threshold (0.4, 0.1 in the paper). statistics: see the module
    docstring. implementation: None or "epilogue" (two accumulators and the epilogue), "reference" (the explicit
    rewrite, `act_reference`)."""
    if implementation == "reference":
        return act_reference(query, key, value, causal=causal, head_mask=head_mask, beta=beta, tau=tau,
                             statistics=statistics, scale=scale)
    if implementation not in (None, "epilogue"):
        raise NotImplementedError(f"act.implementation: expected None, 'epilogue' or 'reference' (both "
                                  f"materialised), got {implementation!r}")
    check_act_options(beta, tau, statistics)
    args, probs = _prepare(query, key, value, causal, scale)
    heads = head_mask_array(head_mask, probs.shape[1])
    sink = act_sink_set(probs, tau=tau, statistics=statistics) & heads[:, None, None]
    p_sink, p_rest = jnp.where(sink, probs, 0.0), jnp.where(sink, 0.0, probs)
    # Two accumulators, as a fused kernel would keep them, combined by the epilogue.
    out = act_flash_epilogue(_apply(args, p_sink), _apply(args, p_rest), p_sink.sum(-1), p_rest.sum(-1), beta=beta)
    return _output(args, out)


def act_reference(query, key, value, *, causal: bool = False, head_mask=None, beta: float = 0.4, tau: float = 0.1,
                  statistics: Literal["full", "prefix"] = "prefix", scale: float | None = None, **unused):
    """The explicit rewrite: `act_calibrate` on the materialised maps, then the maps times the values."""
    args, probs = _prepare(query, key, value, causal, scale)
    return _output(args, _apply(args, act_calibrate(probs, head_mask, beta=beta, tau=tau, statistics=statistics)))


# ---- Per-layer head lists ----------------------------------------------------------------------------------------
# ACT calibrates a searched set of (layer, head) pairs (the official scripts keep one list per model and task, over
# layers 2-30 of Llama-2-7B-chat; `attnx.analysis.act_head_search` finds one). A model selects them with one gin line
# through `LLMConfig.layer_attention`, one ('act', kwargs) entry per layer with that layer's head mask.

def act_heads_from_pairs(pairs, num_layers: int) -> tuple[tuple[int, ...], ...]:
    """(layer, head) pairs, the official lists' format -> per-layer head tuples (entry l for layer l)."""
    if isinstance(num_layers, bool) or not isinstance(num_layers, int) or num_layers < 1:
        raise ValueError(f"act.num_layers: expected an int >= 1, got {num_layers!r}")
    layers = [[] for _ in range(num_layers)]
    for pair in pairs:
        if not (isinstance(pair, (tuple, list)) and len(pair) == 2 and all(
                isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in pair)):
            raise ValueError(f"act.pairs: expected (layer, head) pairs of ints >= 0, got {pair!r}")
        if pair[0] >= num_layers:
            raise ValueError(f"act.pairs: layer {pair[0]} of {tuple(pair)} is outside [0, {num_layers}) (the depth)")
        layers[pair[0]].append(pair[1])
    return tuple(tuple(sorted(set(heads))) for heads in layers)


def act_layer_attention(layer_heads, num_heads: int, *, beta: float = 0.4, tau: float = 0.1,
                        statistics: Literal["full", "prefix"] = "prefix") -> tuple[tuple[str, dict], ...]:
    """An `LLMConfig.layer_attention` tuple calibrating, in layer l, the query heads layer_heads[l] (a tuple of
    per-layer head-index tuples, repeated over the depth like any layer_attention pattern; an empty tuple leaves the
    layer's maps as they are). Each entry is ('act', {'head_mask': N booleans, 'beta', 'tau', 'statistics'})."""
    check_act_options(beta, tau, statistics)
    if isinstance(num_heads, bool) or not isinstance(num_heads, int) or num_heads < 1:
        raise ValueError(f"act.num_heads: expected an int >= 1 (the query heads), got {num_heads!r}")
    if not isinstance(layer_heads, (tuple, list)) or not layer_heads or not all(
            isinstance(heads, (tuple, list)) for heads in layer_heads):
        raise ValueError(f"act.layer_heads: expected a non-empty tuple of per-layer head tuples, got {layer_heads!r}")
    entries = []
    for layer, heads in enumerate(layer_heads):
        if not all(isinstance(h, int) and not isinstance(h, bool) and 0 <= h < num_heads for h in heads):
            raise ValueError(f"act.layer_heads[{layer}]: expected head indices in [0, {num_heads}), got {heads!r}")
        mask = tuple(h in heads for h in range(num_heads))
        entries.append(("act", {"head_mask": mask, "beta": beta, "tau": tau, "statistics": statistics}))
    return tuple(entries)


# ---- Decoding: running column sums beside the KV cache ------------------------------------------------------------

def _decode_heads(head_mask, statistics) -> int:
    if statistics != "prefix":
        raise NotImplementedError(f"act: decoding needs statistics='prefix' (causal); 'full' chooses the sinks from "
                                  f"every row of the prompt, later ones included, got statistics={statistics!r}")
    if head_mask is None:
        raise NotImplementedError("act: decoding keeps a column sum per query head, so it needs head_mask (one bool "
                                  "per query head; act_layer_attention entries carry it), got head_mask=None")
    return len(head_mask)


def act_cache_init(batch_size: int, length: int, key_shape, value_shape, dtype, *, head_mask=None,
                   statistics: str = "prefix", **unused):
    """KV cache of `length` positions plus colsum [B, N, length] float32: sum of the (uncalibrated) attention each
    column has received from the rows decoded so far."""
    del unused
    num_heads = _decode_heads(head_mask, statistics)
    return {"key": jnp.zeros((batch_size, length, *key_shape), dtype),
            "value": jnp.zeros((batch_size, length, *value_shape), dtype),
            "colsum": jnp.zeros((batch_size, num_heads, length), F32)}


def act_cache_decode(query, key, value, cache, cache_index, *, rope_theta, head_mask=None, beta: float = 0.4,
                     tau: float = 0.1, statistics: str = "prefix", scale: float | None = None, implementation=None):
    """The T new rows at positions cache_index .. + T - 1 (pre-rotary query/key [B, T, N|K, H]): written into the
    cache, attended over it with ACT's prefix sink sets (column sums from the cache plus the rows of this chunk), and
    the column sums advanced. Equals the rows of `act_attention(..., statistics='prefix')` on the whole sequence."""
    del implementation
    check_act_options(beta, tau, statistics)
    _decode_heads(head_mask, statistics)
    B, T, N, H = query.shape
    K, L = key.shape[2], cache["key"].shape[1]
    positions = cache_index + jnp.arange(T, dtype=jnp.int32)
    if rope_theta is not None:
        query = rotary_embedding(query, positions, theta=rope_theta)
        key = rotary_embedding(key, positions, theta=rope_theta)
    start = (0, cache_index, 0, 0)
    keys = jax.lax.dynamic_update_slice(cache["key"], key.astype(cache["key"].dtype), start)
    values = jax.lax.dynamic_update_slice(cache["value"], value.astype(cache["value"].dtype), start)
    scale = H ** -0.5 if scale is None else scale
    qg = jnp.moveaxis(query.astype(F32).reshape(B, T, K, N // K, H), 1, 3)  # [B, K, G, T, H]
    logits = (jnp.einsum("bkgth,bskh->bkgts", qg, keys.astype(F32), precision=HIGHEST) * scale).reshape(B, N, T, L)
    i, j = positions[:, None], jnp.arange(L)[None, :]
    probs = jax.nn.softmax(jnp.where(j <= i, logits, -jnp.inf), axis=-1)  # [B, N, T, L]
    prefix = cache["colsum"][:, :, None, :] + jnp.cumsum(probs, axis=-2)  # sum over rows <= i of A_rj
    sink = _first_hit_removed(jnp.where(j <= i, prefix / jnp.maximum(i - j + 1, 1), 0.0) > tau)
    # act_calibrate's rewrite, row by row (row 0 keeps its S columns in the ratios and gets A[0, 0] = 1)
    freed = (1.0 - beta) * jnp.sum(jnp.where(sink, probs, 0.0), axis=-1, keepdims=True)
    row0 = (positions == 0)[:, None]
    rest = jnp.where(sink & ~row0, 0.0, probs)
    n = jnp.sum(rest, axis=-1, keepdims=True)
    maps = jnp.where(sink, beta * probs, probs) + freed * rest / jnp.where(n > 0, n, 1.0)
    maps = jnp.where(row0 & (j == 0), 1.0, maps)
    maps = jnp.where(head_mask_array(head_mask, N)[:, None, None], maps, probs)
    out = jnp.einsum("bkgts,bskv->btkgv", maps.reshape(B, K, N // K, T, L), values.astype(F32), precision=HIGHEST)
    cache = {"key": keys, "value": values, "colsum": cache["colsum"] + jnp.sum(probs, axis=-2)}
    return out.reshape(B, T, N, -1).astype(query.dtype), cache
