"""The registered multimodal mechanisms: causal self attention (CAB pattern CS) over a sequence with a fixed image
span, each with its mask (cca, mma, composite), logit bias (head_modulation), post-softmax transform (var) or head
scale (vhr). The math and the papers are in masks.py, var.py and heads.py.

Static inputs come in as keyword arguments (spans as (start, end) pairs, head and token indices as tuples), so that a
model selects a mechanism with one `attention` / `attention_kwargs` pair in gin. Every entry refuses the non-causal
and cross patterns with ValueError. Without an image span (the registry defaults of cca and mma) each entry is plain
causal softmax attention.

Causality. The image block of CCA and MMA is not causal by design (an image token sees later image tokens, MMA's also
the question), so the CAB prefix property holds for their text rows, and for whole sequences only when no image is
declared; their registry defaults declare none for that reason. composite, var, vhr and head_modulation keep every
row causal and are prefix-consistent with an image (spans are clipped to the sequence).

Decoding. Each `*_decode` evaluates the same (query index, key index) predicate for queries at `query_positions` over
cache slots, restricted to slots at or before the last query (slots after it are not written yet), so it equals the
last rows of the full forward as long as the image was prefilled in one chunk (what `generate` does with a prompt).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from attnx.api import dot_product_attention
from attnx.mask import Mask
from attnx.ops.multimodal import heads as head_ops
from attnx.ops.multimodal import masks
from attnx.ops.multimodal.var import sink_mask, var_softmax
from attnx.rotary import rotary_embedding
from attnx.validation import canonicalize


def _check_self_causal(name: str, query, key, causal: bool) -> None:
    if not causal:
        raise ValueError(f"{name}: causal self attention only (CAB pattern CS): the mechanism masks a causal "
                         f"multimodal sequence; got causal=False")
    if query.shape[-3] != key.shape[-3]:
        raise ValueError(f"{name}: self attention only (CAB pattern CS): query and key positions share one sequence; "
                         f"got query length {query.shape[-3]} and key length {key.shape[-3]}")


def _dense(predicate, T: int, S: int) -> Mask:
    return Mask(dense=predicate(jnp.arange(T)[:, None], jnp.arange(S)[None, :]))


def _decode_mask(predicate, query_positions, cache_length: int) -> Mask:
    q = jnp.asarray(query_positions)[:, None]
    k = jnp.arange(cache_length)[None, :]
    return Mask(dense=predicate(q, k) & (k <= jnp.max(q)))


def _combine(m: Mask, mask: Mask | None) -> Mask:
    return m if mask is None else m & mask


# ---- Masks: cca, mma, composite -------------------------------------------------------------------------------

def _cca_predicate(image_start, grid):
    if image_start is None and grid is None:
        return lambda q, k: k <= q
    if image_start is None or grid is None:
        raise ValueError(f"cca: give both image_start and grid (or neither, for no image), got image_start="
                         f"{image_start!r}, grid={grid!r}")
    start = masks.check_int("cca.image_start", image_start)
    grid = masks.check_grid("cca.grid", grid)
    return lambda q, k: masks.cca_allowed(q, k, start=start, grid=grid)


def cca_attention(query, key, value, *, causal: bool = False, image_start: int | None = None,
                  grid: int | None = None, mask: Mask | None = None, **kwargs):
    """Softmax attention under the CCA mask for a grid x grid image at [image_start, image_start + grid^2).

    The concentric rotary positions are not applied here (positions are rotated in the layer before this call):
    pass `cca_position_ids(image_start, T, grid)` as the layer's positions."""
    _check_self_causal("cca", query, key, causal)
    predicate = _cca_predicate(image_start, grid)
    T = query.shape[-3]
    return dot_product_attention(query, key, value, mask=_combine(_dense(predicate, T, T), mask), **kwargs)


def cca_rotary_positions(index, *, image_start: int | None = None, grid: int | None = None, **unused):
    """The rotary positions a layer should use for sequence indices `index` under cca's attention kwargs: the
    concentric positions of `cca_positions_of`, or `index` itself when no image is declared. Registered as the
    entry's `rotary_positions`, which the attention layer applies before it rotates queries and keys."""
    del unused
    if image_start is None and grid is None:
        return index
    _cca_predicate(image_start, grid)  # validates
    return masks.cca_positions_of(index, start=image_start, grid=grid)


def cca_decode(query, key_cache, value_cache, *, query_positions, image_start=None, grid=None, mask=None, **kwargs):
    m = _decode_mask(_cca_predicate(image_start, grid), query_positions, key_cache.shape[-3])
    return dot_product_attention(query, key_cache, value_cache, mask=_combine(m, mask), **kwargs)


def _mma_predicate(image_span, question_span):
    image_span = masks.check_span("mma.image_span", image_span)
    question_span = masks.check_span("mma.question_span", question_span)
    if image_span is None or question_span is None:  # AKI's text-only path: empty spans, plain causal
        return lambda q, k: k <= q
    return lambda q, k: masks.mma_allowed(q, k, image_span=image_span, question_span=question_span)


def mma_attention(query, key, value, *, causal: bool = False, image_span=None, question_span=None,
                  mask: Mask | None = None, **kwargs):
    """Softmax attention under the modality-mutual mask (image rows also see the question columns). Padding:
    pass `mask=Mask(kv_lengths=...)` (the code clears padding key columns)."""
    _check_self_causal("mma", query, key, causal)
    predicate = _mma_predicate(image_span, question_span)
    T = query.shape[-3]
    return dot_product_attention(query, key, value, mask=_combine(_dense(predicate, T, T), mask), **kwargs)


def mma_decode(query, key_cache, value_cache, *, query_positions, image_span=None, question_span=None, mask=None,
               **kwargs):
    m = _decode_mask(_mma_predicate(image_span, question_span), query_positions, key_cache.shape[-3])
    return dot_product_attention(query, key_cache, value_cache, mask=_combine(m, mask), **kwargs)


def _composite_predicate(image_span):
    image_span = masks.check_span("composite.image_span", image_span)
    if image_span is None:
        return lambda q, k: k <= q
    return lambda q, k: masks.composite_allowed(q, k, image_span=image_span)


def composite_attention(query, key, value, *, causal: bool = False, image_span=None, mask: Mask | None = None,
                        **kwargs):
    """Softmax attention under EE-MLLM's composite mask: image rows return their own value (the value path)."""
    _check_self_causal("composite", query, key, causal)
    T = query.shape[-3]
    m = Mask(causal=True) & _dense(_composite_predicate(image_span), T, T)  # causal lets fast paths skip blocks
    return dot_product_attention(query, key, value, mask=_combine(m, mask), **kwargs)


def composite_decode(query, key_cache, value_cache, *, query_positions, image_span=None, mask=None, **kwargs):
    m = _decode_mask(_composite_predicate(image_span), query_positions, key_cache.shape[-3])
    return dot_product_attention(query, key_cache, value_cache, mask=_combine(m, mask), **kwargs)


# ---- Post-softmax transform: var ---------------------------------------------------------------------------------

def _var(query, key, value, allowed, query_positions, image_span, sinks, p, rho, summ, scale):
    image_span = masks.check_span("var.image_span", image_span)
    args = canonicalize(query, key, value)
    sink = sink_mask(sinks, args.k.shape[1])
    if sink.ndim > 1:  # [*B, S] -> the canonical single batch axis
        sink = jnp.broadcast_to(sink, args.batch_shape + sink.shape[-1:]).reshape(-1, sink.shape[-1])
    out = var_softmax(args.q, args.k, args.v, allowed, sink, image_span, p=p, rho=rho, summ=summ,
                      query_positions=query_positions, scale=scale)
    return out.reshape(args.batch_shape + out.shape[1:])


def _check_detection(sinks, sink_dims, tau) -> None:
    """sink_dims / tau are the model's sink detection (models/layers/mixers/multimodal.py reads the hidden states
    and passes `sinks` as a bool array); the attention function itself never sees hidden states."""
    if sink_dims is None:
        return
    if isinstance(sinks, (tuple, list)):
        raise ValueError(f"var.sink_dims={sink_dims!r}: sinks are detected from the hidden states by the model's "
                         f"router (VARSinkDetector), which passes `sinks` as a bool [*B, S] array; a direct call takes "
                         f"sinks (token indices or that array), got sinks={sinks!r}")
    if isinstance(tau, bool) or not isinstance(tau, (int, float)) or tau < 0:
        raise ValueError(f"var.tau: expected a number >= 0 (the sink threshold on |RMSNorm(h)|), got {tau!r}")


def var_attention(query, key, value, *, causal: bool = False, image_span=None, sinks=(), p: float = 0.6,
                  rho: float = 0.5, summ: float = 0.2, scale: float | None = None, implementation: str | None = None,
                  sink_dims=None, tau: float = 20.0):
    """Causal softmax attention with VAR applied to the probabilities (materialised reference path only).

    sinks: static tuple of sink token indices, or a bool [*B, S] array (e.g. from `var_sink_tokens`). sink_dims /
    tau: the in-model detection options, read by the layer's router (which then passes `sinks`), not here."""
    _check_self_causal("var", query, key, causal)
    _check_detection(sinks, sink_dims, tau)
    if implementation not in (None, "reference"):
        raise NotImplementedError(f"var: a post-softmax transform has only the materialised 'reference' path, got "
                                  f"implementation={implementation!r}")
    T = query.shape[-3]
    allowed = jnp.tril(jnp.ones((T, T), bool))
    return _var(query, key, value, allowed, None, image_span, sinks, p, rho, summ, scale)


def var_decode(query, key_cache, value_cache, *, query_positions, image_span=None, sinks=(), p: float = 0.6,
               rho: float = 0.5, summ: float = 0.2, scale: float | None = None, implementation=None, sink_dims=None,
               tau: float = 20.0):
    del implementation
    _check_detection(sinks, sink_dims, tau)
    positions = jnp.asarray(query_positions)
    allowed = jnp.arange(key_cache.shape[-3])[None, :] <= positions[:, None]
    return _var(query, key_cache, value_cache, allowed, positions, image_span, sinks, p, rho, summ, scale)


# VAR's decoding cache (a registry CacheRule): one slot per position as usual, plus the sink flag of every cached
# token. With in-model detection the layer's router sees only the new tokens' hidden states, so the flags of earlier
# tokens must be kept; the code keeps its prefill sink indices the same way (class state, `indices[layer]`).

def var_cache_init(batch_size: int, length: int, key_shape, value_shape, dtype, **unused):
    del unused
    return {"key": jnp.zeros((batch_size, length, *key_shape), dtype),
            "value": jnp.zeros((batch_size, length, *value_shape), dtype),
            "sink": jnp.zeros((batch_size, length), bool)}


def var_cache_decode(query, key, value, cache, cache_index, *, rope_theta, sinks=(), **kwargs):
    """The T new tokens (pre-rotary query/key, positions cache_index .. + T - 1) are written into the cache with their
    sink flags (a bool [*B, T] `sinks` from the router; a static tuple or a full-length [*B, L] array is used as is)
    and attend through `var_decode`."""
    steps, length = query.shape[-3], cache["key"].shape[-3]
    positions = cache_index + jnp.arange(steps, dtype=jnp.int32)
    if rope_theta is not None:
        query = rotary_embedding(query, positions, theta=rope_theta)
        key = rotary_embedding(key, positions, theta=rope_theta)
    start = (0, cache_index, 0, 0)
    cache = dict(cache, key=jax.lax.dynamic_update_slice(cache["key"], key.astype(cache["key"].dtype), start),
                 value=jax.lax.dynamic_update_slice(cache["value"], value.astype(cache["value"].dtype), start))
    if not isinstance(sinks, (tuple, list)) and jnp.shape(sinks)[-1] == steps and steps != length:
        new = jnp.broadcast_to(jnp.asarray(sinks, bool), cache["sink"].shape[:-1] + (steps,))
        cache["sink"] = jax.lax.dynamic_update_slice(cache["sink"], new, (0, cache_index))
        sinks = cache["sink"]
    out = var_decode(query, cache["key"].astype(query.dtype), cache["value"].astype(query.dtype),
                     query_positions=positions, sinks=sinks, **kwargs)
    return out, cache


# ---- Head transforms: vhr, head_modulation -----------------------------------------------------------------------

def _vhr_scale(num_heads, heads, alpha, head_scale):
    if head_scale is not None:
        return jnp.asarray(head_scale, jnp.float32)
    return head_ops.heads_scale(num_heads, heads, alpha)


def vhr_attention(query, key, value, *, causal: bool = False, heads=(), alpha: float = 2.0, head_scale=None,
                  mask: Mask | None = None, **kwargs):
    """Causal softmax attention whose selected heads' outputs are multiplied by alpha (VHR).

    heads: static tuple of the reinforced (top-VHD) heads; head_scale: a [N] (or [*B, T, N]) scale instead, e.g.
    `vhr_head_scale(vhd, top_k, alpha)` computed by the model from an image-free pass."""
    _check_self_causal("vhr", query, key, causal)
    out = dot_product_attention(query, key, value, mask=_combine(Mask(causal=True), mask), **kwargs)
    return head_ops.apply_head_scale(out, _vhr_scale(query.shape[-2], heads, alpha, head_scale))


def vhr_decode(query, key_cache, value_cache, *, query_positions, heads=(), alpha: float = 2.0, head_scale=None,
               mask=None, **kwargs):
    m = _decode_mask(lambda q, k: k <= q, query_positions, key_cache.shape[-3])
    out = dot_product_attention(query, key_cache, value_cache, mask=_combine(m, mask), **kwargs)
    return head_ops.apply_head_scale(out, _vhr_scale(query.shape[-2], heads, alpha, head_scale))


def _modulation_bias(num_heads: int, length: int, tokens, heads, head_scores, alpha):
    if not isinstance(tokens, (tuple, list)):  # per-sequence sets given at run time: bool [*B, S]
        tokens = head_ops.fit_token_mask("head_modulation.tokens", tokens, length)  # cut / padded to the keys
        per_head = _modulation_bias(num_heads, 1, (0,), heads, head_scores, alpha)[:, 0, 0]  # [N] boosts
        return jnp.where(tokens[..., None, None, :], per_head[:, None, None], 0.0)  # [*B, N, 1, S]
    if not all(
            isinstance(i, (int, np.integer)) and not isinstance(i, bool) and i >= 0 for i in tokens):
        raise ValueError(f"head_modulation.tokens: expected a tuple of token indices >= 0, got {tokens!r}")
    heads = head_ops.check_heads("head_modulation.heads", heads, num_heads)
    if head_scores is None:
        head_scores = (1.0,) * len(heads)
    if len(head_scores) != len(heads) or any(float(x) < 0 for x in head_scores):
        raise ValueError(f"head_modulation.head_scores: expected one score >= 0 per selected head ({len(heads)}), "
                         f"got {head_scores!r}")
    scores = jnp.zeros(num_heads, jnp.float32).at[jnp.asarray(heads, jnp.int32)].set(
        jnp.asarray(head_scores, jnp.float32))
    selected = jnp.zeros(length, bool).at[jnp.asarray([i for i in tokens if i < length], jnp.int32)].set(True)
    return head_ops.head_modulation_bias(selected, scores, alpha)  # [N, 1, S], broadcast over batch and rows


def head_modulation_attention(query, key, value, *, causal: bool = False, tokens=(), heads=(), head_scores=None,
                              alpha: float = 1.0, mask: Mask | None = None, **kwargs):
    """Causal softmax attention with log(1 + alpha s_h) added to head h's logits of the selected `tokens`.

    heads / head_scores: the heads with a nonzero visual sensitivity s_h and their scores (default 1 each); other
    heads get no boost. tokens: static indices (those past the sequence are dropped) or a bool [*B, S'] array, one
    set per sequence given at run time (e.g. PAINT's local | summary masks from models/multimodal.py, or through
    `LLM(..., attention_inputs={'tokens': ...})`), cut or padded with False to the key length S."""
    _check_self_causal("head_modulation", query, key, causal)
    bias = _modulation_bias(query.shape[-2], key.shape[-3], tokens, heads, head_scores, alpha)
    return dot_product_attention(query, key, value, bias, _combine(Mask(causal=True), mask), **kwargs)


def head_modulation_decode(query, key_cache, value_cache, *, query_positions, tokens=(), heads=(), head_scores=None,
                           alpha: float = 1.0, mask=None, **kwargs):
    m = _decode_mask(lambda q, k: k <= q, query_positions, key_cache.shape[-3])
    bias = _modulation_bias(query.shape[-2], key_cache.shape[-3], tokens, heads, head_scores, alpha)
    return dot_product_attention(query, key_cache, value_cache, bias, _combine(m, mask), **kwargs)


def reference_of(fn):
    """The same mechanism through the materialised reference softmax (the oracle for its fast paths)."""
    def reference(query, key, value, **kwargs):
        return fn(query, key, value, implementation="reference", **kwargs)
    reference.__name__ = fn.__name__.replace("_attention", "_reference")
    reference.__doc__ = f"{fn.__name__} through the reference softmax implementation."
    return reference
