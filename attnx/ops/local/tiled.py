"""Neighbourhood attention as token-permuted tiles over block-sparse softmax attention.

Hassani et al., 2024, "Faster Neighborhood Attention", arXiv 2403.04690, §3 (fused NA: the neighbourhood as a
block-sparse pattern) and NATTEN's Hopper/Blackwell FNA ("token permute"): in row-major order a 2-D neighbourhood
spans k rows of the grid, so when a block holds only part of a row, every query block meets k or more key blocks;
permuting the tokens into multi-dimensional tiles (e.g. 4 x 4 patches of the image, each contiguous) makes a query
block one tile, whose neighbourhoods lie within the few tiles around it. `default_tile` searches the tile shapes
of the block's token count (row-major runs, tile (1, .., A), among them) for the one that keeps the fewest block
pairs. The attention then runs on the permuted sequence with

- a block mask (`Mask(block_mask=..., block_size=(A, A))`, A = the tile's token count) that keeps only the tile
  pairs holding at least one allowed pair, so a block-skipping kernel computes only those;
- NATTEN's exact element-wise rule as a `mask_mod` traced into the kernel, computed from the permuted indices by
  integer arithmetic (no table lookups, so it can live inside a GPU kernel);
- the relative positional bias as a `score_mod` (a table lookup: backends that cannot gather inside the kernel
  refuse it with NotImplementedError).

and the output is permuted back. Any attnx softmax backend that honours block masks and mask_mod runs it: the
chunked path on CPU (block skipping in lax loops), and the Pallas kernels of issue 7 on accelerators. The result
equals `neighborhood_attention` exactly up to float rounding (same mask, same bias), which the tests check.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax.numpy as jnp
import numpy as np
from jax import lax

from attnx.api import dot_product_attention
from attnx.mask import Mask
from attnx.ops.softmax.config import IMPLEMENTATIONS, Chunked
from attnx.ops.local.tables import coordinates, read_only


def _div(xp, a, b):
    """a // b for a >= 0. Inside kernels lax.div (truncating) instead of jnp's floor division, which the Triton
    lowering rejects (found by the multi-stream kernel's CUDA lowering test); equal for non-negative a."""
    return a // b if xp is np else lax.div(a, jnp.asarray(b, a.dtype))


def _rem(xp, a, b):
    return a % b if xp is np else lax.rem(a, jnp.asarray(b, a.dtype))


def axis_allowed(xp, qi, kj, L: int, k: int, d: int, s: int, causal: bool):
    """NATTEN's per-axis rule (neighborhood.py docstring) on coordinates qi (queries) and kj (keys) broadcast
    against each other; xp is numpy (static tables) or jax.numpy (inside a kernel's mask_mod)."""
    qd, kd, g = _div(xp, qi, d), _div(xp, kj, d), _rem(xp, qi, d)
    group_len = _div(xp, L - g + d - 1, d)
    if causal:
        leader = xp.minimum(_div(xp, qd, s) * s + s - 1, group_len - 1)
        ok = (qd - kd >= 0) & (leader - kd < k)
    else:
        left, right = k // 2, k // 2 + k % 2 - 1
        leader = xp.minimum(_div(xp, qd, s) * s + s // 2, group_len - 1)
        centre = xp.clip(leader, left, group_len - 1 - right)
        ok = (kd - centre >= -left) & (kd - centre <= right)
    return ok & (_rem(xp, kj, d) == g)


def check_tile(name: str, grid: tuple[int, ...], tile) -> tuple[int, ...]:
    tile = tuple(tile) if isinstance(tile, (tuple, list)) else None
    if tile is None or len(tile) != len(grid) or not all(
            isinstance(t, (int, np.integer)) and not isinstance(t, bool) and t > 0 and L % t == 0
            for t, L in zip(tile, grid)):
        raise ValueError(f"{name}.tile: expected one positive int per grid axis dividing it (grid {grid}), got "
                         f"{tile!r}")
    return tuple(int(t) for t in tile)


@functools.lru_cache(maxsize=64)
def tile_permutation(grid: tuple[int, ...], tile: tuple[int, ...]):
    """(perm [T], inverse [T]): permuted position p holds row-major token perm[p]; tiles in row-major order over
    the tile grid, tokens row-major within each tile."""
    c = coordinates(grid)
    tiles = tuple(L // t for L, t in zip(grid, tile))
    tile_index = np.ravel_multi_index(tuple((c // np.asarray(tile)).T), tiles)
    within = np.ravel_multi_index(tuple((c % np.asarray(tile)).T), tile)
    perm = np.argsort(tile_index * math.prod(tile) + within, kind="stable")
    return read_only(perm.astype(np.int32), np.argsort(perm).astype(np.int32))


def _unpermute_coordinates(xp, p, grid, tile):
    """Row-major grid coordinates (one array per axis) of permuted positions p (integer arithmetic only)."""
    area = math.prod(tile)
    tiles = tuple(L // t for L, t in zip(grid, tile))
    tile_index, within = _div(xp, p, area), _rem(xp, p, area)
    coords = []
    for a in range(len(grid)):
        tile_stride = math.prod(tiles[a + 1:])
        within_stride = math.prod(tile[a + 1:])
        coords.append(_rem(xp, _div(xp, tile_index, tile_stride), tiles[a]) * tile[a]
                      + _rem(xp, _div(xp, within, within_stride), tile[a]))
    return coords


def _axis_tile_mask(L: int, t: int, k: int, d: int, s: int, causal: bool) -> np.ndarray:
    """[L / t, L / t] bool: tile pairs of one axis holding an allowed (query, key) pair."""
    i = np.arange(L)
    allowed = axis_allowed(np, i[:, None], i[None, :], L, k, d, s, causal)
    return allowed.reshape(L // t, t, L // t, t).any(axis=(1, 3))


@functools.lru_cache(maxsize=256)
def tiled_block_mask(grid, tile, kernel, dilation, stride, causal) -> np.ndarray:
    """[T / A, T / A] bool over the permuted sequence (A = prod(tile)): tile pairs with at least one allowed pair.
    Exact from the per-axis masks alone: the neighbourhood is an AND over axes and a tile a product of per-axis
    intervals, so a tile pair holds an allowed pair iff every axis's interval pair does (no T x T mask is built)."""
    rank = len(grid)
    masks = [_axis_tile_mask(*args) for args in zip(grid, tile, kernel, dilation, stride, causal)]
    combined = np.ones((1,) * (2 * rank), bool)
    for a, m in enumerate(masks):
        shape = [1] * (2 * rank)
        shape[a], shape[rank + a] = m.shape
        combined = combined & m.reshape(shape)
    n = math.prod(m.shape[0] for m in masks)
    return read_only(combined.reshape(n, n))[0]


def _divisors(L: int, limit: int) -> list[int]:
    return [t for t in range(1, min(L, limit) + 1) if L % t == 0]


@functools.lru_cache(maxsize=256)
def default_tile(grid, kernel, dilation, stride, causal, tokens: int = 64) -> tuple[int, ...]:
    """The tile that skips the most: among tiles of the largest token count <= `tokens` whose sides divide the
    grid, the one whose block mask keeps the fewest tile pairs (ties: the squarest). Row-major blocks are one of
    the candidates (tile (1, .., A) when the last axis allows it), so the choice never does worse than them: for
    2-D NA, k = 7 on 64 x 64 with 16-token blocks, 4 x 4 tiles keep 3.2% of the pairs against 6.8% for one
    16-token run of a row; with small kernels in 3-D, long thin tiles can win."""
    candidates = [()]
    for L in grid:
        candidates = [c + (t,) for c in candidates for t in _divisors(L, tokens) if math.prod(c) * t <= tokens]
    area = max(math.prod(c) for c in candidates)

    def cost(tile):
        kept = tiled_block_mask(tuple(grid), tile, kernel, dilation, stride, causal).sum()
        return kept, max(tile) - min(tile)

    return min((c for c in candidates if math.prod(c) == area), key=cost)


def _rules(grid, tile, kernel, dilation, stride, causal, rpb):
    """(mask_mod, score_mod or None) on permuted positions."""
    def mask_mod(b, n, t, j):
        qc, kc = _unpermute_coordinates(jnp, t, grid, tile), _unpermute_coordinates(jnp, j, grid, tile)
        ok = True
        for a, (L, k, d, s, is_causal) in enumerate(zip(grid, kernel, dilation, stride, causal)):
            ok = ok & axis_allowed(jnp, qc[a], kc[a], L, k, d, s, is_causal)
        return ok

    if rpb is None:
        return mask_mod, None

    def score_mod(score, b, n, t, j):
        qc, kc = _unpermute_coordinates(jnp, t, grid, tile), _unpermute_coordinates(jnp, j, grid, tile)
        flat = 0
        for a, (k, d) in enumerate(zip(kernel, dilation)):  # the RPB index of neighborhood._dense_bias
            # kc - qc is a multiple of d for every allowed pair, so truncating division is exact where it counts
            flat = flat * (2 * k - 1) + jnp.clip(lax.div(kc[a] - qc[a], jnp.int32(d)) + k - 1, 0, 2 * k - 2)
        return score + rpb[n, flat]

    return mask_mod, score_mod


def _inner_implementation(name: str, implementation, area: int):
    """The softmax backend with blocks of one tile: Chunked(A, A) by default; a name or config of a backend with
    block_q / block_kv fields gets them set to A."""
    if implementation is None:
        return Chunked(block_q=area, block_kv=area)
    if isinstance(implementation, str):
        if implementation not in IMPLEMENTATIONS:
            raise ValueError(f"{name}.tiled_implementation: unknown {implementation!r}; known: "
                             f"{sorted(IMPLEMENTATIONS)}")
        implementation = IMPLEMENTATIONS[implementation]()
    fields = {f.name for f in dataclasses.fields(implementation)}
    if {"block_q", "block_kv"} <= fields:
        implementation = dataclasses.replace(implementation, block_q=area, block_kv=area)
    return implementation


def tiled_neighborhood(q, k, v, rpb, grid, options, scale, tile=None, implementation=None):
    """Canonical q [B, T, N, H], k/v [B, T, K, *] on `grid` -> [B, T, N, V]. options: (kernel, dilation, stride,
    causal) per axis, as neighborhood._options returns; rpb: [N, prod(2k - 1)] float32 or None."""
    tile = default_tile(grid, *options) if tile is None else check_tile("neighborhood", grid, tile)
    perm, inverse = tile_permutation(grid, tile)
    area = math.prod(tile)
    block_mask = tiled_block_mask(grid, tile, *options)
    mask_mod, score_mod = _rules(grid, tile, *options, rpb)
    out = dot_product_attention(q[:, perm], k[:, perm], v[:, perm],
                                mask=Mask(block_mask=jnp.asarray(block_mask), block_size=(area, area)),
                                mask_mod=mask_mod, score_mod=score_mod, scale=scale,
                                implementation=_inner_implementation("neighborhood", implementation, area))
    return out[:, inverse]
