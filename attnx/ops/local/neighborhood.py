"""Neighbourhood attention (NA): every token attends to the k^d tokens around it on its grid.

Hassani et al., 2023, "Neighborhood Attention Transformer", CVPR 2023, arXiv 2204.07143, §3.1 (definition, RPB);
Hassani & Shi, 2022, "Dilated Neighborhood Attention Transformer", arXiv 2209.15001, §3 (dilation); Hassani et al.,
2024, "Faster Neighborhood Attention", arXiv 2403.04690, §3 (fused NA, causal and per-axis options). The semantics
follow the official code, SHI-Labs/NATTEN: the mask of `get_na_flex_mask` (src/natten/backends/flex.py, v0.21) for
windows, dilation, stride and causality, and `get_window_start` / `get_pb_start` of v0.15.1
(csrc/include/natten/cpu/naive/natten_cpu_commons.h) for the relative positional bias (RPB).

Per grid axis of length L, kernel k, dilation d, stride s (NATTEN's definition):
    a query at i is in dilation group g = i mod d with in-group index i' = i div d; its group has
    L_g = ceil((L - g) / d) tokens. Keys come from the same group only.
    non-causal: the stride-group leader l = min((i' div s) s + s div 2, L_g - 1) is centred in a window of k
        in-group positions (k div 2 on the left, k - 1 - k div 2 on the right) that is shifted inward at the
        borders: start = clamp(l - k div 2, 0, L_g - k). Every query sees exactly k keys per axis (needs L >= k d).
    causal: keys j' with j' <= i' and l - j' < k, where l = min((i' div s) s + s - 1, L_g - 1) (the last query of
        the stride group). Early queries see fewer keys; no shifting, so any L >= 1 works.
    A d-D neighbourhood is the AND of the per-axis ones over row-major flattened tokens (prod(k) keys).
RPB: rpb [N, 2k_1 - 1, ...]; logit(i, j) = scale q_i.k_j + rpb[n, (j'_1 - i'_1) + k_1 - 1, ...], the index that
    `get_pb_start` + window offset gives (self at k - 1, border queries reach 0 or 2k - 2). NATTEN 0.15 allowed RPB
    with odd kernels only; the same index is used here for any kernel (no new semantics for odd kernels).
stride = 1 is NA proper; stride s > 1 is NATTEN's generalised NA (v0.20+), and s = k gives blocked (Swin-style
    window) attention. NATTEN requires s <= k. With causal axes and s > 1, the leader is clamped to the sequence end,
    so the result is not prefix-invariant (that is NATTEN's definition); the decode rule supports s = 1 only.

Implementations: "gather" (default): a static neighbour table [T, prod(k)], keys/values gathered to
[B, T, prod(k), K, H], O(T prod(k)) memory; "tiled": tokens permuted into multi-d tiles and run through attnx's
block-skipping softmax attention with the rule as a mask_mod (attnx/ops/local/tiled.py; `tile=` per axis,
`tiled_implementation=` the softmax backend, default chunked with one tile per block, "pallas_gpu"/"pallas_tpu"
on accelerators); "reference": the dense masked softmax (`na_mask`, dense RPB bias) through attnx's reference
attention, the oracle. `na_block_mask` gives the block-level mask of the row-major layout
for block-sparse kernels; the "tiled" path permutes tokens into multi-d tiles first.
Patterns: NS and CS (self attention only; causal=True makes every axis causal, `causal_axes` picks some).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from attnx.api import dot_product_attention
from attnx.mask import Mask
from attnx.ops.local.tables import check_self, coordinates, per_axis, per_axis_bool, read_only, resolve_grid
from attnx.ops.local.tiled import axis_allowed, tiled_neighborhood
from attnx.validation import canonicalize

IMPLEMENTATIONS = ("gather", "tiled", "reference")
HIGHEST = jax.lax.Precision.HIGHEST


# ---- Static tables (numpy) ----

def _axis_table(L: int, k: int, d: int, s: int, causal: bool):
    """Per axis: neighbour [L, k], valid [L, k], RPB offset index [L, k] (0 .. 2k - 2)."""
    i = np.arange(L)[:, None]
    t = np.arange(k)[None, :]
    g, ip = i % d, i // d
    group_len = (L - g + d - 1) // d
    if causal:
        leader = np.minimum((ip // s) * s + s - 1, group_len - 1)
        tp = leader - k + 1 + t
        valid = (tp >= 0) & (tp <= ip)
    else:
        left, right = k // 2, k // 2 + k % 2 - 1
        leader = np.minimum((ip // s) * s + s // 2, group_len - 1)
        tp = np.clip(leader, left, group_len - 1 - right) - left + t
        valid = np.ones((L, k), bool)
    key = np.where(valid, g + d * tp, i)  # invalid slots point at the query itself and are masked
    rel = np.where(valid, tp - ip + k - 1, k - 1)
    if rel.min() < 0 or rel.max() > 2 * k - 2:  # guards the stride <= kernel reasoning
        raise AssertionError(f"neighborhood: RPB offset out of range for L={L} k={k} d={d} s={s}")
    return key, valid, rel


@functools.lru_cache(maxsize=64)
def na_tables(grid: tuple, kernel: tuple, dilation: tuple, stride: tuple, causal: tuple):
    """Neighbour table of the gather path: (index [T, M] int32 key of each slot, valid [T, M] bool, rel [T, M] int32
    flat index into the RPB table of shape prod(2k - 1)), M = prod(kernel), slots row-major over the axes."""
    rank = len(grid)
    tables = [_axis_table(*args) for args in zip(grid, kernel, dilation, stride, causal)]
    # Broadcast axis a's [L_a, k_a] table to [L_0, ..., L_{r-1}, k_0, ..., k_{r-1}], then flatten queries and slots.
    def spread(table, a):
        shape = [1] * (2 * rank)
        shape[a], shape[rank + a] = table.shape
        return table.reshape(shape)
    full = tuple(grid) + tuple(kernel)
    index = np.zeros(full, np.int64)
    rel = np.zeros(full, np.int64)
    valid = np.ones(full, bool)
    key_strides = np.cumprod((1,) + tuple(grid[::-1]))[:rank][::-1]
    rel_strides = np.cumprod((1,) + tuple(2 * k - 1 for k in kernel[::-1]))[:rank][::-1]
    for a, (key, ok, offset) in enumerate(tables):
        index = index + spread(key, a) * key_strides[a]
        rel = rel + spread(offset, a) * rel_strides[a]
        valid = valid & spread(ok, a)
    T, M = math.prod(grid), math.prod(kernel)
    return read_only(index.reshape(T, M).astype(np.int32), valid.reshape(T, M), rel.reshape(T, M).astype(np.int32))


@functools.lru_cache(maxsize=64)
def na_mask(grid: tuple, kernel: tuple, dilation: tuple, stride: tuple, causal: tuple) -> np.ndarray:
    """[T, T] bool, True where query i attends key j: NATTEN's flex mask evaluated on every (query, key) pair."""
    c = coordinates(grid)
    allowed = np.ones((len(c), len(c)), bool)
    for a, (L, k, d, s, is_causal) in enumerate(zip(grid, kernel, dilation, stride, causal)):
        allowed &= axis_allowed(np, c[:, a][:, None], c[None, :, a], L, k, d, s, is_causal)
    return read_only(allowed)[0]


def na_block_mask(grid, kernel_size, *, block_size: tuple[int, int], dilation=1, stride=1, causal=False,
                  causal_axes=None) -> np.ndarray:
    """[ceil(T / bq), ceil(T / bk)] bool: blocks of the row-major NA mask holding at least one allowed pair, for
    `Mask(block_mask=..., block_size=block_size)` together with the dense `na_mask` (a block-sparse kernel skips
    the False blocks). Permuting tokens into multi-d tiles first (implementation "tiled", attnx/ops/local/tiled.py)
    often skips more."""
    grid = tuple(grid) if isinstance(grid, (tuple, list)) else (grid,)
    grid = resolve_grid("na_block_mask", grid, math.prod(grid) if all(isinstance(g, int) for g in grid) else 0)
    options = _options("na_block_mask", grid, kernel_size, dilation, stride, causal, causal_axes)
    mask = na_mask(grid, *options)
    bq, bk = block_size
    T = len(mask)
    nq, nk = -(-T // bq), -(-T // bk)
    padded = np.zeros((nq * bq, nk * bk), bool)
    padded[:T, :T] = mask
    return padded.reshape(nq, bq, nk, bk).any(axis=(1, 3))


# ---- Argument checks ----

def _options(name, grid, kernel_size, dilation, stride, causal, causal_axes):
    rank = len(grid)
    kernel = per_axis(f"{name}.kernel_size", kernel_size, rank, minimum=1)
    dilation = per_axis(f"{name}.dilation", dilation, rank, minimum=1)
    stride = per_axis(f"{name}.stride", stride, rank, minimum=1)
    if causal_axes is None:
        axes = (bool(causal),) * rank
    else:
        axes = per_axis_bool(f"{name}.causal_axes", causal_axes, rank)
        if causal and not all(axes):
            raise ValueError(f"{name}: causal=True makes every axis causal, but causal_axes={causal_axes!r}; give "
                             f"causal=False with causal_axes for a per-axis choice")
    for a, (L, k, d, s, c) in enumerate(zip(grid, kernel, dilation, stride, axes)):
        if s > k:
            raise ValueError(f"{name}.stride: {s} on axis {a} exceeds the kernel size {k} (NATTEN needs stride <= "
                             f"kernel_size)")
        if not c and L < k * d:
            raise ValueError(f"{name}: axis {a} of grid {grid} has {L} tokens, fewer than kernel_size x dilation = "
                             f"{k} x {d}; non-causal neighbourhoods need L >= k d (lower kernel_size or dilation)")
    return kernel, dilation, stride, axes


def _check_rpb(name, rpb, num_heads, kernel):
    shape = (num_heads, *(2 * k - 1 for k in kernel))
    if tuple(np.shape(rpb)) != shape:
        raise ValueError(f"{name}.rpb: expected shape {shape} (query heads, 2 k - 1 per axis), got "
                         f"{tuple(np.shape(rpb))}")
    return jnp.asarray(rpb, jnp.float32).reshape(num_heads, -1)


# ---- The two paths ----

def _gather(q, k, v, rpb, tables, scale):
    index, valid, rel = tables
    B, T, N, H = q.shape
    K = k.shape[2]
    qg = q.astype(jnp.float32).reshape(B, T, K, N // K, H)
    keys = jnp.take(k.astype(jnp.float32), index, axis=1)  # [B, T, M, K, H]
    values = jnp.take(v.astype(jnp.float32), index, axis=1)
    logits = scale * jnp.einsum("btkgh,btmkh->btkgm", qg, keys, precision=HIGHEST)
    if rpb is not None:
        bias = jnp.take(rpb, rel, axis=1)  # [N, T, M]
        logits = logits + jnp.moveaxis(bias, 0, 1).reshape(T, K, N // K, -1)
    logits = jnp.where(valid[:, None, None, :], logits, -jnp.inf)  # each row keeps its own key: never all masked
    probs = jax.nn.softmax(logits, axis=-1)
    out = jnp.einsum("btkgm,btmkv->btkgv", probs, values, precision=HIGHEST)
    return out.reshape(B, T, N, -1)


def _dense_bias(rpb, grid, kernel, dilation):
    """[N, T, T] RPB logits of every pair, from coordinates (entries of disallowed pairs are clipped, unused)."""
    c = coordinates(grid)
    flat = np.zeros((len(c), len(c)), np.int64)
    for a, (k, d) in enumerate(zip(kernel, dilation)):
        offset = np.clip((c[None, :, a] - c[:, a][:, None]) // d + k - 1, 0, 2 * k - 2)
        flat = flat * (2 * k - 1) + offset
    return jnp.take(rpb, flat, axis=1)


def neighborhood_attention(query, key, value, *, causal: bool = False, grid=None, kernel_size=7, dilation=1,
                           stride=1, causal_axes=None, rpb=None, use_rpb: bool = False, scale: float | None = None,
                           implementation: str | None = None, tile=None, tiled_implementation=None):
    """query [*B, T, N, H], key [*B, T, K, H], value [*B, T, K, V] -> [*B, T, N, V]; tokens row-major on `grid`.

    grid: the token layout (h, w) / (t, h, w) / (L,); None = a 1-D sequence of length T. kernel_size, dilation,
    stride: an int or one per axis. causal: every axis causal (CAB pattern CS); causal_axes: per-axis choice (with
    causal=False). rpb: relative positional bias [N, 2 k_1 - 1, ...] (query heads), or None. use_rpb: set by
    configs whose model layer owns the table (models/layers/mixers/relative_bias.py); True without `rpb` is an
    error rather than a silent bias-free run. scale: default H^-1/2 (applied to q.k before the bias).
    implementation: "gather" (default), "tiled" or "reference". tile: the tiled path's tile per axis (default:
    the sparsest 64-token tile, `tiled.default_tile`); tiled_implementation: its softmax backend (default
    attnx.Chunked with one tile per block).
    """
    args = canonicalize(query, key, value)
    B, T, N, H = args.q.shape
    check_self("neighborhood", T, args.k.shape[1])
    grid = resolve_grid("neighborhood", grid, T)
    options = _options("neighborhood", grid, kernel_size, dilation, stride, causal, causal_axes)
    if rpb is None and use_rpb:
        raise ValueError("neighborhood: use_rpb=True but no rpb table was given; the model layer's NeighborhoodBias "
                         "(ROUTERS['neighborhood']) supplies it, direct calls pass rpb=[N, 2k-1, ...]")
    bias = None if rpb is None else _check_rpb("neighborhood", rpb, N, options[0])
    scale = H**-0.5 if scale is None else float(scale)
    implementation = implementation or IMPLEMENTATIONS[0]
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"neighborhood.implementation: {implementation!r}; allowed: {IMPLEMENTATIONS} or None")
    if implementation != "tiled" and (tile is not None or tiled_implementation is not None):
        raise ValueError(f"neighborhood: tile / tiled_implementation apply to implementation='tiled' only, got "
                         f"implementation={implementation!r}")
    if implementation == "reference":
        dense_bias = None if bias is None else _dense_bias(bias, grid, options[0], options[1])[None]
        mask = Mask(dense=jnp.asarray(na_mask(grid, *options)))
        out = dot_product_attention(args.q, args.k, args.v, dense_bias, mask, scale=scale, implementation="reference")
    elif implementation == "tiled":
        out = tiled_neighborhood(args.q, args.k, args.v, bias, grid, options, scale, tile, tiled_implementation)
    else:
        out = _gather(args.q, args.k, args.v, bias, na_tables(grid, *options), scale)
    out = out.astype(args.q.dtype)
    return out.reshape(args.batch_shape + out.shape[1:])


def neighborhood_reference(query, key, value, **kwargs):
    """The dense masked oracle (`implementation="reference"`)."""
    return neighborhood_attention(query, key, value, **{**kwargs, "implementation": "reference"})


def neighborhood_decode(query, key_cache, value_cache, *, query_positions, grid=None, kernel_size=7, dilation=1,
                        stride=1, causal_axes=None, rpb=None, use_rpb: bool = False, scale: float | None = None,
                        implementation: str | None = None):
    """Causal 1-D NA of queries at `query_positions` [T] over a cache (slot j = position j): position p attends to
    p - d t for t = 0 .. k - 1 (>= 0), the last rows of the full causal forward. Stride 1 only (with a stride the
    window depends on where the sequence ends)."""
    del implementation
    if grid is not None and len(tuple(np.atleast_1d(grid))) != 1 or causal_axes not in (None, True, (True,), [True]):
        raise NotImplementedError("neighborhood decode: 1-D causal sequences only (grid=None)")
    k = per_axis("neighborhood.kernel_size", kernel_size, 1, minimum=1)[0]
    d = per_axis("neighborhood.dilation", dilation, 1, minimum=1)[0]
    if per_axis("neighborhood.stride", stride, 1, minimum=1)[0] != 1:
        raise NotImplementedError("neighborhood decode: stride 1 only (a causal stride group's window depends on "
                                  "the sequence end)")
    if rpb is None and use_rpb:
        raise ValueError("neighborhood: use_rpb=True but no rpb table was given")
    N, H = query.shape[-2:]
    back = jnp.asarray(query_positions)[:, None] - jnp.arange(key_cache.shape[-3])[None, :]  # p - j, [T, L]
    allowed = (back >= 0) & (back % d == 0) & (back // d < k)
    bias = None
    if rpb is not None:
        table = _check_rpb("neighborhood", rpb, N, (k,))
        bias = jnp.take(table, jnp.clip(k - 1 - back // d, 0, 2 * k - 2), axis=1)  # [N, T, L]
    scale = H**-0.5 if scale is None else float(scale)
    return dot_product_attention(query, key_cache, value_cache, bias, Mask(dense=allowed), scale=scale)
