"""Key-block lists for block-skipping flash attention: which (query block, key block) tiles a mask leaves alive.

A kernel that loops over `range(count)` and loads key block `ids[t]` never computes a tile the mask rules out
entirely; this is the block-sparse formulation of FlashAttention-2 (Dao, 2023, arXiv 2307.08691, §3.1 "block-sparse
FlashAttention" as in FlashAttention-1 §3.3) and of the SeerAttention kernel (arXiv 2410.13276). Everything here is
plain jnp run in the wrapper, O(B·N·nq·nk) memory, so lists are built once per call and shared by forward and
backward.

Tables are bool `live[B|1, N|1, nq, nk]` (the tile holds at least one allowed pair) and `full[...]` (every pair of
the tile is allowed). `lists(live, full)` compacts them into int32 rows `[n_full, n_live, full ids..., partial
ids...]` (entries past n_live are never read), so a GPU kernel reads one small row per program and runs the full
tiles without any element-wise mask.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from attnx.mask import Mask

__all__ = ["block_list_from_mask", "full_blocks", "live_blocks", "lists", "mask_mod_tables", "next_pow2",
           "static_band"]


def next_pow2(x: int) -> int:
    return 1 << max(0, int(x) - 1).bit_length()


def block_list_from_mask(block_mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    """bool [..., nq, nk] -> (ids int32 [..., nq, nk], counts int32 [..., nq]): for each query block, the ids of
    its live key blocks in increasing order (entries past `counts` are unspecified, never read)."""
    block_mask = jnp.asarray(block_mask)
    if block_mask.dtype != jnp.bool_ or block_mask.ndim < 2:
        raise ValueError(f"block_mask: expected a bool array [..., nq, nk], got "
                         f"{block_mask.dtype}{list(block_mask.shape)}")
    # A stable argsort of "not live" puts the live ids first, in order.
    ids = jnp.argsort(jnp.logical_not(block_mask), axis=-1, stable=True).astype(jnp.int32)
    counts = jnp.sum(block_mask, axis=-1, dtype=jnp.int32)
    return ids, counts


def lists(live: jax.Array, full: jax.Array) -> jax.Array:
    """bool live, full [..., n] -> int32 [..., width] = [n_full, n_live, full ids..., partial ids...] (width a power
    of two >= n + 2: a GPU kernel loads the row with a power-of-two block). Full tiles come first so that a kernel
    runs them in a loop without the element-wise mask, then the partial ones with it."""
    full = full & live
    rank = jnp.where(full, 0, jnp.where(live, 1, 2)).astype(jnp.int32)
    ids = jnp.argsort(rank, axis=-1, stable=True).astype(jnp.int32)
    n_full = jnp.sum(full, axis=-1, dtype=jnp.int32)
    n_live = jnp.sum(live, axis=-1, dtype=jnp.int32)
    out = jnp.concatenate([n_full[..., None], n_live[..., None], ids], axis=-1)
    width = next_pow2(live.shape[-1] + 2)
    return jnp.pad(out, [(0, 0)] * (out.ndim - 1) + [(0, width - out.shape[-1])])


def static_band(mask: Mask, T: int, S: int, bq: int, bk: int, nq: int, nk: int) -> np.ndarray:
    """[nq, nk] numpy bool: tiles that causal/window (with q_offset) and the real lengths T, S leave reachable."""
    left, right = mask.effective_window
    live = np.zeros((nq, nk), bool)
    for i in range(nq):
        r0, r1 = i * bq, min((i + 1) * bq, T) - 1
        if r0 >= T:
            continue
        lo = 0 if left is None else max(0, r0 + mask.q_offset - left)
        hi = S - 1 if right is None else min(S - 1, r1 + mask.q_offset + right)
        if lo <= hi:
            live[i, lo // bk: hi // bk + 1] = True
    return live


def _seg_ranges(ids: jax.Array, blk: int, n_blocks: int):
    """Per-block (min, max) of segment ids [Bs, L]; the padding up to n_blocks·blk counts for neither."""
    ids = jnp.asarray(ids, jnp.int32)
    info = jnp.iinfo(jnp.int32)
    pad = n_blocks * blk - ids.shape[-1]
    lo = jnp.pad(ids, ((0, 0), (0, pad)), constant_values=info.max).reshape(-1, n_blocks, blk)
    hi = jnp.pad(ids, ((0, 0), (0, pad)), constant_values=info.min).reshape(-1, n_blocks, blk)
    return jnp.min(lo, axis=-1), jnp.max(hi, axis=-1)


def block_mask_is_aligned(mask: Mask, bq: int, bk: int) -> bool:
    """True when each kernel tile lies inside one block of `mask.block_mask` (its block sizes are multiples of the
    kernel's), so the block mask is exact at tile level and needs no element-wise test."""
    ubq, ubk = mask.block_size
    return ubq % bq == 0 and ubk % bk == 0


def live_blocks(mask: Mask, T: int, S: int, bq: int, bk: int, dense: jax.Array | None = None) -> jax.Array:
    """bool [B|1, N|1, nq, nk]: tiles that no component of `mask` rules out entirely.

    dense: an optional element mask [Bd, Nd, T, S] (the caller's dense mask, possibly with an unaligned block mask
    folded in); an aligned `mask.block_mask` is read at tile level here.
    """
    nq, nk = -(-T // bq), -(-S // bk)
    live = jnp.asarray(static_band(mask, T, S, bq, bk, nq, nk))[None, None]
    rows = jnp.arange(nq) * bq
    cols = jnp.arange(nk) * bk
    if mask.q_lengths is not None:
        live = live & (rows[None, :] < jnp.asarray(mask.q_lengths)[:, None])[:, None, :, None]
    if mask.kv_lengths is not None:
        live = live & (cols[None, :] < jnp.asarray(mask.kv_lengths)[:, None])[:, None, None, :]
    if mask.q_segment_ids is not None:
        # Sorted (packed) ids make this exact; unsorted ones only lose skipping, never correctness.
        qlo, qhi = _seg_ranges(mask.q_segment_ids, bq, nq)
        klo, khi = _seg_ranges(mask.kv_segment_ids, bk, nk)
        live = live & ((qlo[:, :, None] <= khi[:, None, :]) & (klo[:, None, :] <= qhi[:, :, None]))[:, None]
    if mask.block_mask is not None and block_mask_is_aligned(mask, bq, bk):
        ubq, ubk = mask.block_size
        bm = jnp.asarray(mask.block_mask)
        ri = np.minimum(np.arange(nq) * bq // ubq, bm.shape[-2] - 1)
        ci = np.minimum(np.arange(nk) * bk // ubk, bm.shape[-1] - 1)
        live = live & bm[:, :, ri][:, :, :, ci]
    if dense is not None:
        d = jnp.pad(dense.astype(bool), ((0, 0), (0, 0), (0, nq * bq - T), (0, nk * bk - S)))
        live = live & jnp.any(d.reshape(d.shape[:2] + (nq, bq, nk, bk)), axis=(3, 5))
    return live


def mask_mod_tables(mask_mod, B: int, N: int, T: int, S: int, bq: int, bk: int):
    """(live, full) bool [B, N, nq, nk] of a `mask_mod(b, n, t, j)` evaluated tile by tile (b [B,1,1,1],
    n [1,N,1,1], t [bq,1], j [1,bk] absolute indices): a lax.map over query tiles keeps the memory at one row of
    tiles, O(B·N·bq·S), instead of the whole [T, S] grid."""
    nq, nk = -(-T // bq), -(-S // bk)
    b_idx = jnp.arange(B)[:, None, None, None]
    n_idx = jnp.arange(N)[None, :, None, None]

    def row(i):
        t = i * bq + jnp.arange(bq)[:, None]

        def col(j):
            c = j * bk + jnp.arange(bk)[None, :]
            mm = jnp.broadcast_to(jnp.asarray(mask_mod(b_idx, n_idx, t, c), bool), (B, N, bq, bk))
            live = jnp.any(mm & (t < T) & (c < S), axis=(2, 3))
            full = jnp.all(mm | (t >= T), axis=(2, 3))  # padded rows do not count; padded keys: see full_blocks
            return live, full

        return jax.vmap(col)(jnp.arange(nk))

    live, full = jax.lax.map(row, jnp.arange(nq))  # [nq, nk, B, N]
    return jnp.transpose(live, (2, 3, 0, 1)), jnp.transpose(full, (2, 3, 0, 1))


def full_blocks(mask: Mask, T: int, S: int, bq: int, bk: int, dense: jax.Array | None = None) -> jax.Array:
    """bool [B|1, N|1, nq, nk]: tiles in which every pair of a real query row (< T) is allowed, so a kernel may
    skip the element-wise mask there. A tile holding padded keys (>= S) is never full; padded query rows are sliced
    off by the caller and do not count. An aligned block mask acts at tile level (through `live_blocks`) and does not
    make a tile partial."""
    nq, nk = -(-T // bq), -(-S // bk)
    left, right = mask.effective_window
    r0 = np.arange(nq) * bq
    r1 = np.minimum(r0 + bq, T) - 1
    c0 = np.arange(nk) * bk
    c1 = c0 + bk - 1
    full = np.broadcast_to(c1[None, :] < S, (nq, nk))
    if left is not None:
        full = full & (c0[None, :] >= r1[:, None] + mask.q_offset - left)
    if right is not None:
        full = full & (c1[None, :] <= r0[:, None] + mask.q_offset + right)
    full = jnp.asarray(full)[None, None]
    if mask.q_lengths is not None:
        full = full & (jnp.asarray(r1)[None, :] < jnp.asarray(mask.q_lengths)[:, None])[:, None, :, None]
    if mask.kv_lengths is not None:
        full = full & (jnp.asarray(c1)[None, :] < jnp.asarray(mask.kv_lengths)[:, None])[:, None, None, :]
    if mask.q_segment_ids is not None:
        qlo, qhi = _seg_ranges(mask.q_segment_ids, bq, nq)
        klo, khi = _seg_ranges(mask.kv_segment_ids, bk, nk)
        one_q, one_k = qlo == qhi, klo == khi
        full = full & (one_q[:, :, None] & one_k[:, None, :] & (qlo[:, :, None] == klo[:, None, :]))[:, None]
    if dense is not None:
        d = jnp.pad(dense.astype(bool), ((0, 0), (0, 0), (0, nq * bq - T), (0, nk * bk - S)),
                    constant_values=True)
        full = full & jnp.all(d.reshape(d.shape[:2] + (nq, bq, nk, bk)), axis=(3, 5))
    return full
