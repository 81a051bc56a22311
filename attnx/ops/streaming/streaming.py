"""StreamingLLM: attention sinks plus a window of recent tokens, with a bounded KV cache for decoding.

Xiao et al., 2024, "Efficient Streaming Language Models with Attention Sinks", arXiv 2309.17453, §3.2 (rolling KV
cache with attention sinks) and §3.2's note on positions; official code mit-han-lab/streaming-llm
(`streaming_llm/kv_cache.py` StartRecentKVCache, `pos_shift/modify_llama.py`).

Token t attends to the first `sink` tokens and to the `window` most recent tokens, itself included:
key j is visible iff j <= t and (j < sink or t - j < window). The cache therefore never holds more than
sink + window entries: the code's `evict_for_space` keeps `start_size` entries and the last `recent_size - T` before
the T new tokens are appended, so each new token sees `recent_size` recent entries counting itself.

Positions (the `pos_shift` variant, the paper's method): keys are cached **before** rotary positions and every query
rotates them by their index inside its own view of the cache, [sinks | recent], so a long stream never shows the
model a distance larger than sink + window - 1. Recent keys keep their true distance to the query; sink j sits at
distance (index of the query in the view) - j. With `position_shift=False` keys keep their absolute positions and the
decode equals the rows of the full forward `streaming_attention` (a sliding window with sinks).

Here the cache is a ring: slots [0, sink) hold the sinks, slot sink + (p - sink) % window holds recent position p,
and a position per slot (-1 = empty) records what is where, so no entry ever moves.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from attnx.api import dot_product_attention
from attnx.mask import Mask
from attnx.rotary import rotary_embedding


def check_sink_window(sink, window) -> None:
    if not isinstance(sink, int) or isinstance(sink, bool) or sink < 0:
        raise ValueError(f"streaming.sink: expected an int >= 0 (StreamingLLM uses 4), got {sink!r}")
    if not isinstance(window, int) or isinstance(window, bool) or window < 1:
        raise ValueError(f"streaming.window: expected an int >= 1 (recent tokens kept, e.g. 2000), got {window!r}")


def _visible(query_positions, key_positions, sink: int, window: int):
    t, j = query_positions[:, None], key_positions[None, :]
    return (j <= t) & (j >= 0) & ((j < sink) | (t - j < window))


def streaming_attention(query, key, value, *, causal: bool = True, sink: int = 4, window: int = 16,
                        position_shift: bool = True, mask: Mask | None = None, **kwargs):
    """The full-sequence form: causal self attention to the `sink` first tokens and the `window` most recent ones
    (query [*B, T, N, H], key [*B, T, K, H], value [*B, T, K, V], rotated at their true positions by the caller).
    Causal self attention only (CAB pattern CS): sinks and windows are positions on one causal axis.
    position_shift only concerns decoding (see the module docstring); it is accepted so one set of attention kwargs
    serves both."""
    del position_shift
    check_sink_window(sink, window)
    if not causal:
        raise ValueError("streaming: causal self attention only (pattern CS); StreamingLLM streams a causal LM")
    if query.shape[-3] != key.shape[-3]:
        raise ValueError(f"streaming: self attention only (pattern CS), got query length {query.shape[-3]} and key "
                         f"length {key.shape[-3]}")
    length = query.shape[-3]
    m = Mask(dense=_visible(jnp.arange(length), jnp.arange(length), sink, window))
    return dot_product_attention(query, key, value, mask=m if mask is None else m & mask, **kwargs)


def streaming_reference(query, key, value, **kwargs):
    return streaming_attention(query, key, value, implementation="reference", **kwargs)


def sink_window_init(batch_size: int, length: int, key_shape, value_shape, dtype, *, sink: int = 4,
                     window: int = 16, **_):
    """An empty bounded cache: min(length, sink + window) slots whatever the stream's length."""
    check_sink_window(sink, window)
    slots = min(length, sink + window)
    return {"key": jnp.zeros((batch_size, slots, *key_shape), dtype),
            "value": jnp.zeros((batch_size, slots, *value_shape), dtype),
            "position": jnp.full((slots,), -1, jnp.int32)}


def _rotate(x, positions, rope_theta):
    return x if rope_theta is None else rotary_embedding(x, positions, theta=rope_theta)


def sink_window_decode(query, key, value, cache, cache_index, *, rope_theta, sink: int = 4, window: int = 16,
                       position_shift: bool = True, scale: float | None = None, **_):
    """The T new tokens at positions cache_index .. + T - 1 attend to the cache and to each other; returns
    (out [*B, T, N, V], cache with them added and the evicted ones overwritten). query/key are pre-rotary."""
    check_sink_window(sink, window)
    steps, slots = query.shape[-3], cache["key"].shape[-3]
    new_positions = cache_index + jnp.arange(steps, dtype=jnp.int32)
    keys = jnp.concatenate([cache["key"], key.astype(cache["key"].dtype)], axis=-3).astype(query.dtype)
    values = jnp.concatenate([cache["value"], value.astype(cache["value"].dtype)], axis=-3).astype(query.dtype)
    key_positions = jnp.concatenate([cache["position"], new_positions])
    visible = _visible(new_positions, key_positions, sink, window)  # [T, slots + T]

    # Rotary angles relative to the first new token keep them small on long streams (float32 phases).
    base = cache_index
    recent_logits = _logits(_rotate(query, new_positions - base, rope_theta),
                            _rotate(keys, key_positions - base, rope_theta), scale)
    if position_shift:
        # The query's index inside its view [sinks | recent]: everything between the sinks and the window is gone.
        shift = jnp.maximum(0, new_positions - window + 1 - sink)
        sink_logits = _logits(_rotate(query, new_positions - shift, rope_theta),
                              _rotate(keys, jnp.maximum(key_positions, 0), rope_theta), scale)
        logits = jnp.where((key_positions < sink)[None, None, :], sink_logits, recent_logits)
    else:
        logits = recent_logits
    logits = jnp.where(visible[None, None], logits, -jnp.inf)  # [*B, N, T, slots + T]
    probs = jax.nn.softmax(logits, axis=-1)
    out = _mix(probs, values).astype(query.dtype)

    # Keep the new tokens that stay: sinks, and the last `window` of the stream (distinct ring slots).
    last = cache_index + steps - 1
    keep = (new_positions < sink) | (last - new_positions < window)
    ring = jnp.where(new_positions < sink, new_positions, sink + (new_positions - sink) % window)
    target = jnp.where(keep & (ring < slots), ring, slots)  # `slots` is out of range: dropped
    cache = {"key": cache["key"].at[..., target, :, :].set(key.astype(cache["key"].dtype), mode="drop"),
             "value": cache["value"].at[..., target, :, :].set(value.astype(cache["value"].dtype), mode="drop"),
             "position": cache["position"].at[target].set(new_positions, mode="drop")}
    return out, cache


def _logits(query, key, scale):
    """[*B, T, N, H] x [*B, S, K, H] -> [*B, N, T, S] in float32, query heads grouped over key heads (GQA)."""
    *batch, length, num_heads, head_dim = query.shape
    num_kv_heads = key.shape[-2]
    grouped = query.reshape(*batch, length, num_kv_heads, num_heads // num_kv_heads, head_dim)
    logits = jnp.einsum("...tkgh,...skh->...kgts", grouped.astype(jnp.float32), key.astype(jnp.float32))
    logits = logits.reshape(*batch, num_heads, length, key.shape[-3])
    return logits * (head_dim ** -0.5 if scale is None else scale)


def _mix(probs, value):
    *batch, num_heads, length, _ = probs.shape
    num_kv_heads = value.shape[-2]
    grouped = probs.reshape(*batch, num_kv_heads, num_heads // num_kv_heads, length, probs.shape[-1])
    out = jnp.einsum("...kgts,...skv->...tkgv", grouped, value.astype(jnp.float32))
    return out.reshape(*batch, length, num_heads, value.shape[-1])
