"""GAAM composed with dot-product attention: Gaussian re-weighting of the values (and optionally the queries and
keys), then softmax attention.

The paper (Ioannides, Chadha, Elkins, 2024, "Gaussian Adaptive Attention is All You Need: Robust Contextual
Representations Across Multiple Modalities", arXiv 2401.11143, §3, "compatibility with dot-product-based
attention") presents GAAM as a feature re-weighting that slots in beside dot-product attention rather than a QK
mechanism of its own; the official code (gioannides/Gaussian-Adaptive-Attention `GaussianBlock.py`) is a generic
re-weighter of any tensor along one axis. Here it re-weights each head of the chosen projections, one GAAM head per
attention head (the code's per-chunk delta/c become per-head parameters [heads, G]), then softmax attention:

    x' = GaussianBlock(x) for x in apply_to (default: the values only)
    out = softmax_attention(q', k', v')

GaussianBlock, as in the code: x_0 = x, x_{l+1} = x_l + GAAM_l(x_l) for num_layers layers, each with its own
delta, c ([heads, G] for one layer, [num_layers, heads, G] for several). The code lets every layer pick its own
axis, head count and G; here they share `axis` and G (one tensor of parameters per projection). residual=False
drops the skip (x_{l+1} = GAAM_l(x_l)), i.e. the code's bare MultiHeadGaussianAdaptiveAttention when num_layers=1.
Queries get per-query-head Gaussians [N, G], keys and values per key/value head [K, G]. Queries and keys are
re-weighted as the attention function receives them (after RoPE in the model layer).

axis="sequence" takes the statistics over the positions of each channel (the code README's norm_axis=1 on
[B, T, D] inputs), with prefix statistics when causal (see gaam.py); axis="feature" takes them over the features of
each token, which is causal by construction.

Padding: `mask=attnx.Mask(q_lengths=..., kv_lengths=...)` marks query rows t >= q_lengths and key/value rows
s >= kv_lengths as padding. Besides masking the softmax, the padded rows are the code's padded entries in the
statistics: zeroed for the mean and variance (still counted in n, as the code's x_masked.mean does), passed through
unchanged by each GAAM layer, and (as in the code) still summed into the normaliser with their own weight.

Patterns: all four. The catalogue lists NS, CS because GAAM itself maps one sequence to itself; composed this way
each projection is re-weighted over its own positions, so cross attention works as well, and under causal
attention every row's statistics stop at its own position. Decode keeps no query history, so GAAM on the queries
with axis="sequence" has no decode rule (NotImplementedError); every other combination decodes exactly.
"""

from __future__ import annotations

from typing import Literal

import jax.numpy as jnp

from attnx.ops.builtin import softmax_attention, softmax_decode
from attnx.ops.gaussian.gaam import EPS, _check_params, gaussian_weights

AXES = ("sequence", "feature")
TARGETS = ("query", "key", "value")


def check_targets(apply_to) -> tuple[str, ...]:
    """apply_to (a name or a collection of names from TARGETS) -> the sorted tuple of distinct targets."""
    names = (apply_to,) if isinstance(apply_to, str) else tuple(apply_to)
    if not names or any(name not in TARGETS for name in names):
        raise ValueError(f"gaam.apply_to: expected a non-empty collection of {TARGETS}, got {apply_to!r}")
    return tuple(t for t in TARGETS if t in names)


def check_layers(num_gaussians, num_layers) -> None:
    for name, value in (("num_gaussians", num_gaussians), ("num_layers", num_layers)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"gaam.{name}: expected a positive int, got {value!r}")


def param_shape(num_heads: int, num_gaussians: int, num_layers: int = 1) -> tuple[int, ...]:
    """[heads, G] for one layer (the shape of the code's single MultiHeadGaussianAdaptiveAttention), else
    [num_layers, heads, G]."""
    return (num_heads, num_gaussians) if num_layers == 1 else (num_layers, num_heads, num_gaussians)


def default_params(num_heads: int, num_gaussians: int, num_layers: int = 1):
    """delta = 0 (the code's init) and c = 1 (a deterministic stand-in for the code's exp(randn) init)."""
    shape = param_shape(num_heads, num_gaussians, num_layers)
    return jnp.zeros(shape, jnp.float32), jnp.ones(shape, jnp.float32)


def _layer_params(delta, c, num_heads, num_gaussians, num_layers, name):
    """delta, c -> [num_layers, heads, G] float32, checked against the head count and the layer count."""
    if delta is None and c is None:
        delta, c = default_params(num_heads, num_gaussians, num_layers)
    elif delta is None or c is None:
        raise ValueError(f"{name}: give both (the mixer models/layers/mixers/gaam.py owns them) or neither")
    delta, c = _check_params(delta, c, name)
    if delta.ndim == 2:
        delta, c = delta[None], c[None]
    if delta.ndim != 3 or delta.shape[:2] != (num_layers, num_heads):
        raise ValueError(f"{name}: expected shape [{num_heads}, G] or [num_layers={num_layers}, {num_heads}, G] "
                         f"(heads = {num_heads}), got {tuple(jnp.shape(delta))}")
    return delta, c


def lengths_to_valid(lengths, length: int):
    """[*B] lengths (or None) -> [*B, length] bool, True on the real rows (Mask.q_lengths / kv_lengths)."""
    return None if lengths is None else jnp.arange(length) < jnp.asarray(lengths)[..., None]


def _gaam_heads(x, delta, c, *, causal, axis, eps, valid):
    """One GAAM layer on x [*B, S, heads, D] with delta, c [heads, G]; valid [*B, S] or None."""
    mask = None if valid is None else jnp.broadcast_to(valid[..., None, None], x.shape)
    if axis == "feature":  # per token: the statistics never look at another position
        return gaussian_weights(x, delta, c, eps=eps, mask=mask)[0]
    xs = jnp.moveaxis(x, -3, -1)  # [*B, heads, D, S]
    ms = None if mask is None else jnp.moveaxis(mask, -3, -1)
    y, _ = gaussian_weights(xs, delta[:, None, :], c[:, None, :], eps=eps, causal=causal, mask=ms)
    return jnp.moveaxis(y, -1, -3)


def reweight_values(x, delta=None, c=None, *, causal: bool = False, num_gaussians: int = 4, num_layers: int = 1,
                    axis: Literal["sequence", "feature"] = "sequence", residual: bool = True, eps: float = EPS,
                    valid=None, name: str = "gaam.delta/c"):
    """GaussianBlock over the heads of x [*B, S, heads, D] (values, or queries/keys) -> like x.

    delta, c: [heads, G] or [num_layers, heads, G] (None: default_params); valid: [*B, S] bool (True = real row) or
    None; name: how errors call delta/c."""
    if axis not in AXES:
        raise ValueError(f"gaam.axis: expected one of {AXES}, got {axis!r}")
    check_layers(num_gaussians, num_layers)
    delta, c = _layer_params(delta, c, x.shape[-2], num_gaussians, num_layers, name)
    if valid is not None and jnp.shape(valid) != x.shape[:-2]:
        valid = jnp.broadcast_to(valid, x.shape[:-2])
    for layer in range(num_layers):  # the code's GaussianBlock: x = layer(x) + x
        y = _gaam_heads(x, delta[layer], c[layer], causal=causal, axis=axis, eps=eps, valid=valid)
        x = x + y if residual else y
    return x


def _reweight_all(query, key, value, params, *, apply_to, causal, mask, **options):
    """q, k, v with GAAM applied to those in apply_to; params: {target: (delta, c)}; the padding comes from
    mask.q_lengths / mask.kv_lengths. A parameter given for a projection not in apply_to is an error, so that it is
    never silently ignored."""
    targets = check_targets(apply_to)
    for target, (delta, c) in params.items():
        if target not in targets and (delta is not None or c is not None):
            raise ValueError(f"gaam: Gaussians given for the {target} but apply_to={targets} leaves it untouched")
    q_valid = lengths_to_valid(None if mask is None else mask.q_lengths, query.shape[-3])
    kv_valid = lengths_to_valid(None if mask is None else mask.kv_lengths, key.shape[-3])
    names = {"query": "gaam.query_delta/query_c", "key": "gaam.key_delta/key_c", "value": "gaam.delta/c"}
    out = {"query": query, "key": key, "value": value}
    for target in targets:
        out[target] = reweight_values(out[target], *params[target], causal=causal, name=names[target],
                                      valid=q_valid if target == "query" else kv_valid, **options)
    return out["query"], out["key"], out["value"]


def gaam_attention(query, key, value, *, causal: bool = False, delta=None, c=None, query_delta=None, query_c=None,
                   key_delta=None, key_c=None, apply_to=("value",), num_gaussians: int = 4, num_layers: int = 1,
                   axis: Literal["sequence", "feature"] = "sequence", residual: bool = True, eps: float = EPS,
                   mask=None, **kwargs):
    """Softmax attention over GAAM-re-weighted projections (module docstring). delta/c are the values' Gaussians
    ([K, G] or [num_layers, K, G]), key_delta/key_c the keys' (same shapes), query_delta/query_c the queries'
    ([N, G] or [num_layers, N, G]). kwargs go to softmax attention (bias, scale, implementation, ...)."""
    params = {"query": (query_delta, query_c), "key": (key_delta, key_c), "value": (delta, c)}
    q, k, v = _reweight_all(query, key, value, params, apply_to=apply_to, causal=causal, mask=mask,
                            num_gaussians=num_gaussians, num_layers=num_layers, axis=axis, residual=residual, eps=eps)
    return softmax_attention(q, k, v, causal=causal, mask=mask, **kwargs)


def gaam_attention_reference(query, key, value, **kwargs):
    return gaam_attention(query, key, value, implementation="reference", **kwargs)


def gaam_decode(query, key_cache, value_cache, *, query_positions, delta=None, c=None, query_delta=None,
                query_c=None, key_delta=None, key_c=None, apply_to=("value",), num_gaussians: int = 4,
                num_layers: int = 1, axis: Literal["sequence", "feature"] = "sequence", residual: bool = True,
                eps: float = EPS, mask=None, **kwargs):
    """Decode over a KV cache: the causal re-weighting of the cached keys/values (slot j's statistics stop at j, so
    the empty slots after the last written one never reach a visible row), then softmax decode. Queries are
    re-weighted per token (axis="feature") only: their sequence statistics would need the earlier queries."""
    if "query" in check_targets(apply_to) and axis == "sequence":
        raise NotImplementedError("gaam decode: GAAM on the queries with axis='sequence' needs the statistics of "
                                  "every earlier query, which the KV cache does not keep; use axis='feature' or "
                                  "apply_to without 'query'")
    params = {"query": (query_delta, query_c), "key": (key_delta, key_c), "value": (delta, c)}
    q, k, v = _reweight_all(query, key_cache, value_cache, params, apply_to=apply_to, causal=True, mask=mask,
                            num_gaussians=num_gaussians, num_layers=num_layers, axis=axis, residual=residual, eps=eps)
    return softmax_decode(q, k, v, query_positions=query_positions, mask=mask, **kwargs)
