"""GAAM: Multi-Head Gaussian Adaptive Attention (Ioannides, Chadha, Elkins, 2024, "Gaussian Adaptive Attention is
All You Need: Robust Contextual Representations Across Multiple Modalities", arXiv 2401.11143, §3).

Official code: gioannides/Gaussian-Adaptive-Attention `gaussian_adaptive_attention/GaussianBlock.py`. This module
follows the code where it and the paper differ (the spec, llm_mechanisms.md §10, says so too):

* x is split into `num_heads` contiguous chunks along `axis` (each of length n // num_heads; the last chunk also
  takes the remainder), and every chunk h has its own offsets delta[h, :] and scales c[h, :] over G Gaussians.
* Per chunk, along `axis`: mu = mean, sigma^2 = var + eps with torch's *unbiased* variance (divisor n - 1).
  Padding (mask False) is zeroed for the statistics but, as in the code, still counts in n.
* z_g = (x - mu - delta_g) / sigma,  N_g = exp(-z_g^2 / (2 c_g^2)) / sqrt(2 pi c_g^2)
* W = prod_g N_g (the code takes a *product*; the paper calls it a mixture), W /= max(sum_axis W, eps), y = x * W;
  padded entries pass through unchanged (y = x there), and they do enter the normaliser sum with their own W.
* The code's multi-head wrapper passes its `eps` into an unused constructor argument, so its heads always run with
  eps = 1e-8; here `eps` is honoured and its default 1e-8 reproduces the code.
* `GaussianBlock` stacks layers residually (x <- x + GAAM(x)); the registry entry (attention.py, `gaam`) uses one such
  residual layer on the values by default, and `num_layers` / `apply_to` stack more and reach queries and keys.

Causal form (an attnx addition; the code is bidirectional): with causal=True the output at position t is the
non-causal GAAM of the prefix 0..t, read at its last row, i.e. statistics *and* normaliser over the prefix:

    y_t = x_t W_t(t) / max(sum_{j<=t} W_j(t), eps),   W_j(t) built with the prefix mean/variance of 0..t.

This is exactly what the CAB causality check requires (row t may not depend on later rows) and costs O(n^2) per
channel. A prefix of one element has an unbiased variance of 0/0 (torch returns nan); here it is 0, so y_0 = x_0
when delta = 0 (its only weight normalises to 1).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

EPS = 1e-8  # the code's default (and, through the wrapper's argument slip, the value its heads always use)


def _check_params(delta, c, name: str):
    delta, c = jnp.asarray(delta), jnp.asarray(c)
    if delta.shape != c.shape:
        raise ValueError(f"{name}: delta {delta.shape} and c {c.shape} must have the same shape")
    if delta.ndim < 1 or delta.shape[-1] < 1:
        raise ValueError(f"{name}: delta and c need a last axis of Gaussians (G >= 1), got shape {delta.shape}")
    return delta.astype(jnp.float32), c.astype(jnp.float32)


def _product_of_gaussians(x, mean, var, delta, c):
    """prod_g N((x - mean - delta_g) / sqrt(var); c_g), written as the code does (linear domain, loop over g) so
    underflow and the eps clamp behave alike. delta/c [..., G] broadcast against x."""
    weights = 1.0
    for g in range(delta.shape[-1]):
        z = (x - (mean + delta[..., g])) / jnp.sqrt(var)
        c2 = jnp.square(c[..., g])
        weights = weights * jnp.exp(-jnp.square(z) / (2.0 * c2)) / jnp.sqrt(2.0 * math.pi * c2)
    return weights


@functools.partial(jax.checkpoint, static_argnums=(4,))
def _causal_weights(x, xm, delta, c, eps):
    """W_t(t) / max(sum_{j<=t} W_j(t), eps) along the last axis, with prefix statistics (module docstring).

    The product of the G Gaussians is folded into one exponent, prod_g N_g = C exp(-(A a^2 - 2 B a + D) / 2 sigma^2)
    with a = x - mu, A = sum 1/c^2, B = sum delta/c^2, D = sum delta^2/c^2, C = prod (2 pi c^2)^(-1/2): equal to the
    code's product up to rounding, and one [n, n] exponential instead of G. Checkpointed: the backward pass recomputes
    the [n, n] tables instead of storing them.
    """
    n = x.shape[-1]
    seen = jnp.tril(jnp.ones((n, n), bool))  # [t, j]: j in the prefix of t
    count = jnp.arange(1, n + 1, dtype=jnp.float32)
    mean = jnp.sum(jnp.where(seen, xm[..., None, :], 0.0), -1) / count  # [..., t]
    # Two passes, like torch.var; a prefix of one has no unbiased variance (0/0), taken as 0 (docstring).
    squares = jnp.where(seen, jnp.square(xm[..., None, :] - mean[..., None]), 0.0)
    var = jnp.sum(squares, -1) / jnp.maximum(count - 1.0, 1.0) + eps
    inv = 1.0 / jnp.square(c)
    a_coef, b_coef, d_coef = jnp.sum(inv, -1), jnp.sum(delta * inv, -1), jnp.sum(jnp.square(delta) * inv, -1)
    log_c = -0.5 * jnp.sum(jnp.log(2.0 * math.pi * jnp.square(c)), -1)

    def weight(a, var):
        return jnp.exp(log_c - (a_coef * jnp.square(a) - 2.0 * b_coef * a + d_coef) / (2.0 * var))

    a_coef, b_coef, d_coef, log_c = (v[..., None] for v in (a_coef, b_coef, d_coef, log_c))
    own = weight(x - mean, var)  # W_t(t)
    a_coef, b_coef, d_coef, log_c = (v[..., None] for v in (a_coef, b_coef, d_coef, log_c))
    table = weight(x[..., None, :] - mean[..., None], var[..., None])  # [..., t, j]
    total = jnp.sum(jnp.where(seen, table, 0.0), -1)
    return own / jnp.maximum(total, eps)


def gaussian_weights(x, delta, c, *, eps: float = EPS, mask=None, causal: bool = False):
    """One GAAM head along the last axis of x [..., n]: returns (y [..., n], W [..., n]).

    delta, c [..., G] broadcast against x [..., n] with the n axis dropped (one set of Gaussians per row).
    mask [..., n] (True = real) or None. causal: prefix statistics and normaliser (module docstring); W is then the
    diagonal W_t(t) / normaliser_t.
    """
    x32 = x.astype(jnp.float32)
    valid = None if mask is None else jnp.broadcast_to(jnp.asarray(mask, bool), x.shape)
    xm = x32 if valid is None else jnp.where(valid, x32, 0.0)
    delta, c = delta[..., None, :], c[..., None, :]  # [..., 1, G]: constant along the n axis
    if not causal:
        mean = jnp.mean(xm, -1, keepdims=True)
        var = jnp.var(xm, -1, keepdims=True, ddof=1) + eps
        w = _product_of_gaussians(x32, mean, var, delta, c)
        w = w / jnp.maximum(jnp.sum(w, -1, keepdims=True), eps)
    else:
        w = _causal_weights(x32, xm, delta[..., 0, :], c[..., 0, :], eps)
    y = x32 * w
    if valid is not None:
        y = jnp.where(valid, y, x32)
    return y.astype(x.dtype), w


def _check_gaam(x, delta, c, axis, num_heads, eps, mask):
    if not isinstance(num_heads, int) or isinstance(num_heads, bool) or num_heads < 1:
        raise ValueError(f"gaam.num_heads: expected a positive int, got {num_heads!r}")
    if not isinstance(axis, int) or not -x.ndim <= axis < x.ndim:
        raise ValueError(f"gaam.axis: expected an int in [{-x.ndim}, {x.ndim}) for x of shape {x.shape}, got "
                         f"{axis!r}")
    if x.shape[axis] // num_heads < 1:
        raise ValueError(f"gaam: x has {x.shape[axis]} entries along axis {axis}, fewer than num_heads="
                         f"{num_heads}")
    if delta.shape[:-1] != (num_heads,):
        raise ValueError(f"gaam.delta/c: expected shape [num_heads={num_heads}, G], got {delta.shape}")
    if not eps > 0:
        raise ValueError(f"gaam.eps: expected a number > 0, got {eps!r}")
    if mask is not None and jnp.shape(mask) != x.shape:
        raise ValueError(f"gaam.mask: expected the shape of x {x.shape}, got {jnp.shape(mask)}")


def _split_heads(x, delta, c, axis, num_heads, eps, mask):
    """The checked inputs of a multi-head GAAM with `axis` moved last: (x, xs, ms, delta, c, chunks), where xs/ms
    are x and the mask (or None) with `axis` last and chunks[h] the slice of head h (the code's contiguous chunks of
    n // num_heads; the last one also takes the remainder)."""
    delta, c = _check_params(delta, c, "gaam")
    x = jnp.asarray(x)
    _check_gaam(x, delta, c, axis, num_heads, eps, mask)
    xs = jnp.moveaxis(x, axis, -1)
    ms = None if mask is None else jnp.moveaxis(jnp.asarray(mask, bool), axis, -1)
    n, size = xs.shape[-1], xs.shape[-1] // num_heads
    chunks = [slice(h * size, n if h == num_heads - 1 else (h + 1) * size) for h in range(num_heads)]
    return x, xs, ms, delta, c, chunks


def gaam(x, delta, c, *, axis: int, num_heads: int, eps: float = EPS, mask=None, causal: bool = False,
         return_weights: bool = False):
    """Multi-head GAAM of x along `axis` (code-exact, module docstring).

    x: any shape; delta, c: [num_heads, G] (the code's mean_offsets and c of each head); mask: bool like x
    (True = real entry; the code's `x != padding_value`) or None. Returns y like x, and with return_weights the
    weights W [like x] (the code's `return_attention_details`).
    """
    x, xs, ms, delta, c, chunks = _split_heads(x, delta, c, axis, num_heads, eps, mask)
    ys, ws = [], []
    for h, part in enumerate(chunks):
        y, w = gaussian_weights(xs[..., part], delta[h], c[h], eps=eps, mask=None if ms is None else ms[..., part],
                                causal=causal)
        ys.append(y)
        ws.append(w)
    y = jnp.moveaxis(jnp.concatenate(ys, -1), -1, axis)
    return (y, jnp.moveaxis(jnp.concatenate(ws, -1), -1, axis)) if return_weights else y


def gaam_reference(x, delta, c, *, axis: int, num_heads: int, eps: float = EPS, mask=None, causal: bool = False):
    """The oracle: the code's formula written per chunk with explicit loops; the causal form as the last row of the
    non-causal GAAM of every prefix."""
    if not causal:
        return gaam(x, delta, c, axis=axis, num_heads=num_heads, eps=eps, mask=mask)
    x, xs, ms, delta, c, chunks = _split_heads(x, delta, c, axis, num_heads, eps, mask)
    out = []
    for h, part in enumerate(chunks):
        start, stop = part.start, part.stop
        for t in range(start, stop):
            prefix = xs[..., start:t + 1]
            if t == start:  # a prefix of one: variance taken as 0 (torch: nan), mean = the (masked) element
                x1 = prefix.astype(jnp.float32)
                mean = x1 if ms is None else jnp.where(ms[..., t:t + 1], x1, 0.0)
                w = _product_of_gaussians(x1, mean, jnp.full_like(x1, eps), delta[h], c[h])
                y = x1 * (w / jnp.maximum(w, eps))
                if ms is not None:
                    y = jnp.where(ms[..., t:t + 1], y, x1)
                out.append(y[..., -1].astype(x.dtype))
                continue
            y, _ = gaussian_weights(prefix, delta[h], c[h], eps=eps,
                                    mask=None if ms is None else ms[..., start:t + 1])
            out.append(y[..., -1])
    return jnp.moveaxis(jnp.stack(out, -1), -1, axis)
