"""VAR, Visual Attention Redistribution (Kang, Kim, Kim, Hwang, 2025, "See What You Are Told: Visual Attention Sink
in Large Multimodal Models", ICLR 2025, arXiv 2503.03321, §4-5; code MICV-yonsei/VisAttnSink `src/logic/logic.py`
(DimProspector, HeadFork, VARProcessor) and `src/model/llava.py`).

1. Sinks (`var_sink_tokens`): at prefill, from the residual stream entering layers >= 2, a token is a sink when its
   weight-free RMS-normalised hidden state is large on the model's sink dimensions: max_d |RMSNorm(h)[d]| > tau
   (tau = 20; LLaMA-2-7B dims {2533, 1415}, 13B {2100, 4743}). Sinks inside the image span are *visual* sinks.
2. Image-centric rows (`var_image_centric`): for each (batch, head, query row) of the post-softmax map P, with
   I the image columns, the row qualifies when sum_I P >= summ (0.2) and the visual-sink share
   sum_{I & sink} P / sum_I (P + 1e-6) <= rho (0.5). No visual sink in the sequence: nothing qualifies.
3. Redistribution (`var_redistribute`), on qualifying rows only: every sink column (visual or text) is scaled by p
   (0.6), and the removed mass (1 - p) sum_sinks P goes to the image columns in proportion to the row's non-sink
   image attention. Rows keep their sums; columns that are neither sink nor image are unchanged.

Code details kept here: the share's denominator adds 1e-6 per image column; text sinks lose mass too and their
budget also goes to the image; at prefill only query rows after the image are redistributed (`query_coord >=
im + pa` while the output-token count is negative), and in decoding every new row is after the image anyway, so
the rule here is "rows at positions >= image end". The code skips the last layer and detects sinks from layer 2 on;
the attention function has no layer index, so that schedule is the caller's (pass no sinks to skip a layer):
`var_layer_attention` builds it for the LLM. Inside the LLM the sinks come from the hidden states themselves
(`var_layer_attention(..., sink_dims=, tau=)`): the layer's router, models/layers/mixers/multimodal.py
`VARSinkDetector`, applies `var_sink_tokens` to the residual stream entering the layer and passes the bool mask as
`sinks`, and VAR's cache rule (attention.py `var_cache_decode`) keeps each token's flag beside the KV cache.

This is a post-softmax probability transform, so it runs on the materialised reference path only: O(T S) memory,
no fused kernel (spec §7, "Common API").
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

HIGHEST = jax.lax.Precision.HIGHEST
SHARE_EPS = 1e-6  # the code's per-column epsilon in the visual-sink share


def var_sink_tokens(hidden: jax.Array, sink_dims, tau: float = 20.0, eps: float = 1e-6) -> jax.Array:
    """hidden [*B, T, D] (residual stream entering the layer) -> bool [*B, T]: max over `sink_dims` of
    |h / rms(h)| > tau (the code's weight-free RMSNorm, float32, eps 1e-6)."""
    hidden = jnp.asarray(hidden)
    dims = np.asarray(sink_dims)
    if dims.ndim != 1 or dims.size == 0 or not np.issubdtype(dims.dtype, np.integer):
        raise ValueError(f"var.sink_dims: expected a non-empty sequence of ints, got {sink_dims!r}")
    if dims.min() < 0 or dims.max() >= hidden.shape[-1]:
        raise ValueError(f"var.sink_dims: every dim must lie in [0, {hidden.shape[-1]}) (the hidden width), got "
                         f"{dims.tolist()}")
    h = hidden.astype(jnp.float32)
    normed = h * jax.lax.rsqrt(jnp.mean(jnp.square(h), axis=-1, keepdims=True) + eps)
    return jnp.max(jnp.abs(normed[..., dims]), axis=-1) > tau


def _columns(span, length: int) -> jax.Array:
    j = jnp.arange(length)
    return (j >= span[0]) & (j < span[1])


def _check_fractions(p, rho, summ) -> None:
    for name, x in (("p", p), ("rho", rho), ("summ", summ)):
        if not 0.0 <= float(x) <= 1.0:
            raise ValueError(f"var.{name}: expected a number in [0, 1], got {x!r}")


def var_image_centric(probs: jax.Array, sink: jax.Array, image_span, *, rho: float = 0.5,
                      summ: float = 0.2) -> jax.Array:
    """bool [..., T]: rows of probs [..., T, S] that attend to the image (mass >= summ) but not mostly to its visual
    sinks (share <= rho). sink: bool broadcastable to probs[..., 0, :] (e.g. [S], or [B, 1, S] for [B, N, T, S])."""
    image = _columns(image_span, probs.shape[-1])
    visual_sink = sink[..., None, :] & image  # [..., 1, S]
    image_probs = jnp.where(image, probs, 0.0)
    mass = jnp.sum(image_probs, axis=-1)
    share = jnp.sum(jnp.where(visual_sink, probs, 0.0), axis=-1) / (mass + SHARE_EPS * (image_span[1] - image_span[0]))
    return (share <= rho) & (mass >= summ) & jnp.any(visual_sink, axis=-1)


def var_redistribute(probs: jax.Array, sink: jax.Array, image_span, *, p: float = 0.6, rho: float = 0.5,
                     summ: float = 0.2, query_positions: jax.Array | None = None) -> jax.Array:
    """VAR on a post-softmax map probs [..., T, S] (float32 result).

    sink: bool broadcastable to probs[..., 0, :] (True = sink token, visual or text); image_span: static
    (start, end) key columns of the image; query_positions [T]: absolute position of each row (default 0..T-1),
    only rows at positions >= end are candidates (the code's prefill rule)."""
    _check_fractions(p, rho, summ)
    start, end = image_span
    probs = probs.astype(jnp.float32)
    T, S = probs.shape[-2:]
    sink = jnp.asarray(sink, bool)
    positions = jnp.arange(T) if query_positions is None else jnp.asarray(query_positions)
    rows = var_image_centric(probs, sink, image_span, rho=rho, summ=summ) & (positions >= end)
    sink_cols = jnp.broadcast_to(sink[..., None, :], probs.shape[:-2] + (1, S))
    sink_mass = jnp.sum(jnp.where(sink_cols, probs, 0.0), axis=-1, keepdims=True)
    free_image = jnp.where(_columns(image_span, S) & ~sink_cols, probs, 0.0)  # non-sink image attention
    free_mass = jnp.sum(free_image, axis=-1, keepdims=True)
    # A qualifying row has non-sink image mass >= (1 - rho) summ > 0; the guard only keeps other rows NaN-free.
    ratio = free_image / jnp.where(free_mass > 0, free_mass, 1.0)
    moved = jnp.where(sink_cols, probs * p, probs) + (1.0 - p) * sink_mass * ratio
    return jnp.where(rows[..., None], moved, probs)


def sink_mask(sinks, length: int) -> jax.Array:
    """Static tuple of sink indices -> bool [length] (indices past the sequence are dropped); arrays pass as bool."""
    if isinstance(sinks, (tuple, list)):
        if not all(isinstance(i, (int, np.integer)) and not isinstance(i, bool) and i >= 0 for i in sinks):
            raise ValueError(f"var.sinks: expected a tuple of token indices >= 0 or a bool [*B, S] array, got "
                             f"{sinks!r}")
        mask = np.zeros(length, bool)
        mask[[i for i in sinks if i < length]] = True
        return jnp.asarray(mask)
    sinks = jnp.asarray(sinks)
    if sinks.dtype != jnp.bool_ or sinks.shape[-1] != length:
        raise ValueError(f"var.sinks: expected a bool array whose last axis is the key length {length}, got "
                         f"{sinks.dtype}{list(sinks.shape)}")
    return sinks


def var_softmax(q: jax.Array, k: jax.Array, v: jax.Array, allowed: jax.Array, sink: jax.Array, image_span, *,
                p: float, rho: float, summ: float, query_positions=None, scale: float | None = None) -> jax.Array:
    """Materialised softmax attention with VAR between softmax and P @ V.

    q [B, T, N, H], k [B, S, K, H], v [B, S, K, V], allowed [T, S] bool, sink bool [S] or [B, S] -> [B, T, N, V]."""
    B, T, N, H = q.shape
    K = k.shape[2]
    G = N // K
    scale = H ** -0.5 if scale is None else scale
    qg = q.astype(jnp.float32).reshape(B, T, K, G, H)
    logits = jnp.einsum("btkgh,bskh->bkgts", qg, k.astype(jnp.float32), precision=HIGHEST) * scale
    logits = jnp.where(allowed, logits, -jnp.inf)
    m = jax.lax.stop_gradient(jnp.max(logits, axis=-1, keepdims=True))
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    e = jnp.where(allowed, jnp.exp(jnp.where(allowed, logits, m) - m), 0.0)
    denom = jnp.sum(e, axis=-1, keepdims=True)
    probs = e / jnp.where(denom > 0, denom, 1.0)  # fully masked rows stay 0
    if image_span is not None:
        sink = sink.reshape(sink.shape[:-1] + (1, 1) * (sink.ndim == 2) + sink.shape[-1:])  # [B, 1, 1, S] or [S]
        probs = var_redistribute(probs, sink, image_span, p=p, rho=rho, summ=summ, query_positions=query_positions)
    out = jnp.einsum("bkgts,bskv->btkgv", probs, v.astype(jnp.float32), precision=HIGHEST)
    return out.reshape(B, T, N, v.shape[-1]).astype(q.dtype)


def var_layer_schedule(num_layers: int, first: int = 2, skip_last: bool = True) -> tuple[bool, ...]:
    """Which layers VAR acts in (the code's schedule): sinks are detected, and attention redistributed, from layer
    `first` (2) on, and the last layer is skipped. Returns one bool per layer."""
    if isinstance(num_layers, bool) or not isinstance(num_layers, (int, np.integer)) or num_layers < 1:
        raise ValueError(f"var.num_layers: expected an int >= 1, got {num_layers!r}")
    if isinstance(first, bool) or not isinstance(first, (int, np.integer)) or first < 0:
        raise ValueError(f"var.first: expected an int >= 0 (the first layer with VAR), got {first!r}")
    last = num_layers - 1 if skip_last else num_layers
    return tuple(first <= layer < last for layer in range(num_layers))


def var_layer_attention(num_layers: int, image_span, sinks=(), *, first: int = 2, skip_last: bool = True,
                        p: float = 0.6, rho: float = 0.5, summ: float = 0.2, sink_dims=None,
                        tau: float = 20.0) -> tuple[tuple[str, dict], ...]:
    """An `LLMConfig.layer_attention` tuple applying VAR on `var_layer_schedule`: ('var', kwargs) in every layer,
    with no sinks (plain causal softmax: without a visual sink no row qualifies) in the layers VAR skips.

    sink_dims (None: the static `sinks` indices): detect the sinks inside the model, as the paper does, from the
    hidden state entering each active layer (max over sink_dims of |RMSNorm(h)| > tau; the layer's router
    models/layers/mixers/multimodal.py VARSinkDetector reads `sink_dims` and `tau` and passes the bool mask)."""
    _check_fractions(p, rho, summ)
    on = dict(image_span=tuple(image_span), sinks=tuple(sinks) if isinstance(sinks, (tuple, list)) else sinks,
              p=p, rho=rho, summ=summ)
    if sink_dims is not None:
        dims = np.asarray(sink_dims)
        if dims.ndim != 1 or dims.size == 0 or not np.issubdtype(dims.dtype, np.integer) or dims.min() < 0:
            raise ValueError(f"var.sink_dims: expected a non-empty tuple of hidden dims >= 0, got {sink_dims!r}")
        if isinstance(tau, bool) or not isinstance(tau, (int, float)) or tau < 0:
            raise ValueError(f"var.tau: expected a number >= 0, got {tau!r}")
        on.update(sinks=(), sink_dims=tuple(int(d) for d in dims), tau=float(tau))
    off = {key: value for key, value in on.items() if key not in ("sink_dims", "tau")}
    return tuple(("var", dict(on) if active else dict(off, sinks=()))
                 for active in var_layer_schedule(num_layers, first, skip_last))
