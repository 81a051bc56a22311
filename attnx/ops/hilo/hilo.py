"""HiLo attention (Pan, Cai & Zhuang, 2022, "Fast Vision Transformers with HiLo Attention", NeurIPS 2022, arXiv
2205.13213, §3.2 and Fig. 2). Official code: ziplab/LITv2 `classification/models/attentions.py` (class HiLo),
`models/blocks.py` (DWMlp), `models/litv2.py`.

The heads of one layer are split in two groups that see the same input x:

    n_lo = int(N * alpha), n_hi = N - n_lo        (window == 1: n_hi = 0, n_lo = N, i.e. plain MHSA)
    Hi-Fi (heads 0 .. n_hi - 1): softmax attention inside non-overlapping s x s windows (s = `window`)
    Lo-Fi (heads n_hi .. N - 1): every token's query attends to the s x s average-pooled keys and values
    out = concat([Hi-Fi, Lo-Fi], heads)           (Hi-Fi first, as the code's torch.cat)

In the code each group has its own projections (h_qkv, h_proj; l_q, l_kv, l_proj) and the Lo-Fi keys/values are
l_kv(AvgPool(x)). Average pooling (weights summing to one) commutes with an affine map, so l_kv(AvgPool(x)) ==
AvgPool(l_kv(x)): `hilo_attention` is therefore written on query/key/value heads and pools the Lo-Fi keys and
values itself. The two output projections act on disjoint channel blocks (a block-diagonal output map, no shared
projection after the concatenation), which the shared attention layer's dense output projection does not express;
the model layer is therefore `models/layers/mixers/hilo.py` (SPATIAL_MIXERS), which owns the five projections and
calls `hilo_layer` below (it pools x before l_kv, as the code, to keep Lo-Fi's key/value cost at N / s^2 tokens).

Grids: tokens lie row-major on `grid` (any rank; grid=None = a 1-D sequence, where windows and pooling are runs of s
consecutive tokens). Every grid axis must be a multiple of s: LITv2 pads only in detection/segmentation
(Swin-style), which is not implemented here. Class tokens are refused (LITv2 pools the mean token).
Scale: head_dim^-1/2 in both branches (qk_scale=None in the released configs).
Patterns: NS only (one token grid, non-causal).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from attnx.api import dot_product_attention
from attnx.mask import Mask
from attnx.ops.local.tables import check_self, coordinates, resolve_grid
from attnx.validation import canonicalize

IMPLEMENTATIONS = ("windowed", "reference")
HIGHEST = jax.lax.Precision.HIGHEST


def hilo_heads(num_heads: int, alpha: float, window: int) -> tuple[int, int]:
    """(n_hi, n_lo): LITv2's split, int() rounding toward zero (int(12 * 0.9) = 10 Lo-Fi heads)."""
    if window == 1:
        return 0, num_heads
    n_lo = int(num_heads * alpha)
    return num_heads - n_lo, n_lo


def check_options(alpha, window) -> tuple[float, int]:
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0.0 <= float(alpha) <= 1.0:
        raise ValueError(f"hilo.alpha: the fraction of Lo-Fi heads must be a number in [0, 1], got {alpha!r}")
    if isinstance(window, bool) or not isinstance(window, (int, np.integer)) or window < 1:
        raise ValueError(f"hilo.window: the window / pooling size s must be a positive int, got {window!r}")
    return float(alpha), int(window)


def check_grid(grid: tuple[int, ...], window: int) -> None:
    for axis, length in enumerate(grid):
        if length % window:
            raise ValueError(f"hilo.window: axis {axis} of grid {grid} has {length} tokens, not a multiple of "
                             f"window={window} (LITv2 pads only for dense prediction; not implemented)")


def _blocks(x: jax.Array, grid: tuple[int, ...], s: int) -> jax.Array:
    """[B, T, ...] -> [B, n_windows, s^d, ...]: tokens regrouped by window, windows and in-window tokens row-major."""
    B, rest = x.shape[0], x.shape[2:]
    d = len(grid)
    x = x.reshape(B, *(n for L in grid for n in (L // s, s)), *rest)
    outer, inner = [1 + 2 * a for a in range(d)], [2 + 2 * a for a in range(d)]
    x = x.transpose(0, *outer, *inner, *range(1 + 2 * d, x.ndim))
    return x.reshape(B, math.prod(grid) // s**d, s**d, *rest)


def _unblocks(x: jax.Array, grid: tuple[int, ...], s: int) -> jax.Array:
    """The inverse of `_blocks`: [B, n_windows, s^d, ...] -> [B, T, ...]."""
    B, rest, d = x.shape[0], x.shape[3:], len(grid)
    x = x.reshape(B, *(L // s for L in grid), *([s] * d), *rest)
    order = [n for a in range(d) for n in (1 + a, 1 + d + a)]
    x = x.transpose(0, *order, *range(1 + 2 * d, x.ndim))
    return x.reshape(B, math.prod(grid), *rest)


def pool_tokens(x: jax.Array, grid, window: int) -> jax.Array:
    """[B, T, ...] -> [B, T / s^d, ...]: AvgPool(kernel s, stride s) of row-major grid tokens (grid=None: 1-D)."""
    grid = resolve_grid("hilo", grid, x.shape[1])
    check_grid(grid, window)
    return jnp.mean(_blocks(x, grid, window), axis=2)


def hifi_attention(q, k, v, grid: tuple[int, ...], window: int, scale: float) -> jax.Array:
    """[B, T, n, H] x2, [B, T, n, V] -> [B, T, n, V]: softmax attention inside s x s windows (float32)."""
    qb, kb, vb = (_blocks(x.astype(jnp.float32), grid, window) for x in (q, k, v))
    logits = jnp.einsum("bwinh,bwjnh->bwnij", qb, kb, precision=HIGHEST) * scale
    out = jnp.einsum("bwnij,bwjnv->bwinv", jax.nn.softmax(logits, axis=-1), vb, precision=HIGHEST)
    return _unblocks(out, grid, window)


def lofi_attention(q, k_pooled, v_pooled, scale: float) -> jax.Array:
    """[B, T, n, H], [B, P, n, H], [B, P, n, V] -> [B, T, n, V]: all queries against the pooled tokens."""
    logits = jnp.einsum("btnh,bpnh->bntp", q.astype(jnp.float32), k_pooled.astype(jnp.float32),
                        precision=HIGHEST) * scale
    return jnp.einsum("bntp,bpnv->btnv", jax.nn.softmax(logits, axis=-1), v_pooled.astype(jnp.float32),
                      precision=HIGHEST)


def _windowed(q, k, v, grid, window, n_hi, scale):
    parts = []
    if n_hi:
        parts.append(hifi_attention(q[:, :, :n_hi], k[:, :, :n_hi], v[:, :, :n_hi], grid, window, scale))
    if n_hi < q.shape[2]:
        pooled = [jnp.mean(_blocks(x[:, :, n_hi:].astype(jnp.float32), grid, window), axis=2) for x in (k, v)]
        parts.append(lofi_attention(q[:, :, n_hi:], *pooled, scale))
    return jnp.concatenate(parts, axis=2)


def window_ids(grid: tuple[int, ...], window: int) -> np.ndarray:
    """[T] int: the window of each row-major grid token, id = row-major index of coords // s."""
    cells = coordinates(grid) // window
    return np.ravel_multi_index(tuple(cells.T), tuple(L // window for L in grid))


def _reference(q, k, v, grid, window, n_hi, scale):
    """Hi-Fi as dense attention under the same-window mask; Lo-Fi as cross attention to tokens pooled by an
    explicit [P, T] averaging matrix (an oracle independent of the reshapes of the windowed path)."""
    ids = window_ids(grid, window)
    parts = []
    if n_hi:
        mask = Mask(dense=jnp.asarray(ids[:, None] == ids[None, :]))
        parts.append(dot_product_attention(q[:, :, :n_hi], k[:, :, :n_hi], v[:, :, :n_hi], None, mask, scale=scale,
                                           implementation="reference").astype(jnp.float32))
    if n_hi < q.shape[2]:
        pool = (np.arange(ids.max() + 1)[:, None] == ids[None, :]) / float(window ** len(grid))
        pooled = [jnp.einsum("pt,btnh->bpnh", jnp.asarray(pool, jnp.float32), x[:, :, n_hi:].astype(jnp.float32),
                             precision=HIGHEST) for x in (k, v)]
        parts.append(dot_product_attention(q[:, :, n_hi:].astype(jnp.float32), *pooled, scale=scale,
                                           implementation="reference"))
    return jnp.concatenate(parts, axis=2)


def hilo_attention(query, key, value, *, causal: bool = False, grid=None, alpha: float = 0.9, window: int = 2,
                   scale: float | None = None, implementation: str | None = None):
    """query [*B, T, N, H], key [*B, T, N, H], value [*B, T, N, V] -> [*B, T, N, V]; tokens row-major on `grid`.

    The first N - int(N * alpha) heads are Hi-Fi (window attention), the rest Lo-Fi (pooled keys/values); window=1
    makes every head Lo-Fi over unpooled tokens (plain MHSA), as the code. alpha default 0.9: LITv2's released
    configs (the code's default is 0.5). grid: (h, w), any rank, or None for a 1-D sequence; each axis a multiple
    of `window`. scale: default H^-1/2. implementation: "windowed" (default) or "reference" (dense masked oracle).
    Self attention only, with one key/value head per query head (each head belongs to one branch).
    """
    if causal:
        raise ValueError("hilo: HiLo attention is non-causal (pattern NS only); got causal=True")
    alpha, window = check_options(alpha, window)
    args = canonicalize(query, key, value)
    B, T, N, H = args.q.shape
    check_self("hilo", T, args.k.shape[1])
    if args.k.shape[2] != N:
        raise ValueError(f"hilo: key/value heads K={args.k.shape[2]} must equal the query heads N={N} (every head "
                         f"belongs to the Hi-Fi or the Lo-Fi branch; grouped-query heads are not supported)")
    grid = resolve_grid("hilo", grid, T)
    check_grid(grid, window)
    n_hi, _ = hilo_heads(N, alpha, window)
    scale = H**-0.5 if scale is None else float(scale)
    implementation = implementation or IMPLEMENTATIONS[0]
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"hilo.implementation: {implementation!r}; allowed: {IMPLEMENTATIONS} or None")
    path = _reference if implementation == "reference" else _windowed
    out = path(args.q, args.k, args.v, grid, window, n_hi, scale).astype(args.q.dtype)
    return out.reshape(args.batch_shape + out.shape[1:])


def hilo_reference(query, key, value, **kwargs):
    """The dense masked oracle (`implementation="reference"`)."""
    return hilo_attention(query, key, value, **{**kwargs, "implementation": "reference"})


def _affine(x, weight, bias):
    y = jnp.einsum("btd,de->bte", x, weight, precision=HIGHEST)
    return y if bias is None else y + bias


def hilo_layer(x: jax.Array, weights: dict, *, num_heads: int, grid, alpha: float = 0.9, window: int = 2,
               scale: float | None = None) -> jax.Array:
    """The whole HiLo layer of the code with explicit weights: x [B, T, D] -> [B, T, D].

    weights (biases may be None): h_qkv [D, 3 * n_hi * d], h_qkv_bias, h_proj [n_hi * d, n_hi * d], h_proj_bias
    (Hi-Fi, present when n_hi > 0); l_q [D, n_lo * d], l_q_bias, l_kv [D, 2 * n_lo * d], l_kv_bias,
    l_proj [n_lo * d, n_lo * d], l_proj_bias (Lo-Fi, when n_lo > 0). d = D / num_heads. Feature order of the fused
    projections as the code's reshapes: (which of q/k/v, head, channel).
    """
    alpha, window = check_options(alpha, window)
    B, T, D = x.shape
    if D % num_heads:
        raise ValueError(f"hilo: width D={D} is not a multiple of num_heads={num_heads}")
    grid = resolve_grid("hilo", grid, T)
    check_grid(grid, window)
    d = D // num_heads
    n_hi, n_lo = hilo_heads(num_heads, alpha, window)
    scale = d**-0.5 if scale is None else float(scale)
    parts = []
    if n_hi:
        qkv = _affine(x, weights["h_qkv"], weights.get("h_qkv_bias")).reshape(B, T, 3, n_hi, d)
        hi = hifi_attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], grid, window, scale)
        parts.append(_affine(hi.reshape(B, T, n_hi * d), weights["h_proj"], weights.get("h_proj_bias")))
    if n_lo:
        q = _affine(x, weights["l_q"], weights.get("l_q_bias")).reshape(B, T, n_lo, d)
        pooled = jnp.mean(_blocks(x, grid, window), axis=2) if window > 1 else x
        kv = _affine(pooled, weights["l_kv"], weights.get("l_kv_bias")).reshape(B, -1, 2, n_lo, d)
        lo = lofi_attention(q, kv[:, :, 0], kv[:, :, 1], scale)
        parts.append(_affine(lo.reshape(B, T, n_lo * d), weights["l_proj"], weights.get("l_proj_bias")))
    return jnp.concatenate(parts, axis=-1).astype(x.dtype)
