"""Static layout, block lists and in-kernel masks of the Pallas TPU flash-attention kernels (`pallas_tpu.py`).

Block skipping follows the block-sparse formulation of FlashAttention (Dao et al., 2022, arXiv 2205.14135, §3.3;
FlashAttention-2: Dao, 2023, arXiv 2307.08691, Alg. 1) in the form of splash attention: for every (batch, head,
query block) the wrapper lists the key blocks the mask can reach, and the kernel's innermost grid axis walks that
list through scalar-prefetched indices, so a block the mask rules out is neither loaded nor computed.

Each list entry packs `2 * block_id + needs_mask`: `needs_mask` is 0 for a block the mask leaves entirely visible
(on every valid row), so the kernel skips the element-wise mask there. Entries past a row's count repeat its last
live entry, so the pipeline issues no new copy for the skipped steps. Tables are built per batch element and head
only where some mask component varies over them (`Bl`, `Nl`), which keeps the scalar memory small.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from attnx.ops.softmax.common import score_mod_in_kernel

F32 = jnp.float32
LANES = 128  # TPU vector lane width: head dims are padded to it, row statistics are kept lane-replicated
SUBLANES = 8
NT = (((1,), (1,)), ((), ()))  # a @ b.T
NN = (((1,), (0,)), ((), ()))  # a @ b


@dataclasses.dataclass(frozen=True)
class Layout:
    """Everything the kernels need at trace time (hashable: it is a custom_jvp nondiff argument)."""

    B: int
    T: int
    S: int
    N: int
    K: int
    H: int
    V: int
    Hp: int
    Vp: int
    bq: int
    bk: int
    nq: int
    nk: int
    L: int  # longest key-block list of a query block (static grid width of forward and dQ)
    Lt: int  # longest query-block list of a key block (dK/dV grid width)
    Bl: int  # batch size of the block tables (1 when no mask component varies over the batch)
    Nl: int  # head count of the block tables
    left: int | None
    right: int | None
    q_offset: int
    scale: float
    cap: float | None
    bias_shape: tuple | None  # kernel-layout bias shape [Bb, Nb, Tp|1, Sp|1], None without bias
    seg_B: int  # batch size of the segment-id arrays, 0 without segment ids
    dense_shape: tuple | None  # [Bd, Nd, Tp, Sp] int8 element mask, None without one
    elementwise: bool  # whether any element-wise masking can ever be needed
    out_f32: bool  # forward output in float32 (sinks are folded in afterwards in the wrapper)
    interpret: bool
    score_mod: Callable | None = None  # traced into every kernel body (elementwise in s, b, n, t, j)

    @property
    def G(self) -> int:
        return self.N // self.K

    @property
    def Tp(self) -> int:
        return self.nq * self.bq

    @property
    def Sp(self) -> int:
        return self.nk * self.bk


# Interpret mode emulates TPU semantics on CPU (`pltpu.InterpretParams`: uninitialised memory reads as NaN,
# out-of-bounds block reads raise) where the installed jax offers it. False selects the generic interpreter, about 3x
# cheaper on CPU (measured: ~4 vs ~13 CPU-s to compile and run forward + backward of one small case) but blind to
# those memory semantics; the test suite uses it for the bulk of its conformance cases.
EMULATE_TPU = True


def interpret_arg(lay: Layout):
    """The `interpret=` argument of the kernels' pallas_calls."""
    if not lay.interpret:
        return False
    params = getattr(pltpu, "InterpretParams", None)
    return params() if (params is not None and EMULATE_TPU) else True


# ---- static tables (causal / window / q_offset / key padding) ----------------------------------------------------
def static_tables(T: int, S: int, bq: int, bk: int, left, right, q_offset: int):
    """numpy bool [nq, nk] (live, full): blocks the window can reach, and blocks it leaves entirely visible
    (every valid row sees every column, and no column is key padding)."""
    nq, nk = -(-T // bq), -(-S // bk)
    live = np.zeros((nq, nk), bool)
    full = np.zeros((nq, nk), bool)
    for i in range(nq):
        p_lo, p_hi = i * bq + q_offset, min((i + 1) * bq, T) - 1 + q_offset
        for j in range(nk):
            c_lo, c_hi = j * bk, min((j + 1) * bk, S) - 1
            reach = (left is None or c_hi >= p_lo - left) and (right is None or c_lo <= p_hi + right)
            live[i, j] = reach
            full[i, j] = ((j + 1) * bk <= S and (left is None or c_lo >= p_hi - left)
                          and (right is None or c_hi <= p_lo + right))
    return live, full & live


# ---- dynamic tables (lengths, segment ids, block mask, dense mask) -----------------------------------------------
def block_tables(lay: Layout, mask, dense_i8, block_mask_nested):
    """jnp bool [Bl, Nl, nq, nk] (live, full). `dense_i8` is the kernel's int8 element mask [Bd, Nd, Tp, Sp]
    (padding False) or None; `block_mask_nested` is the user's block mask [Bb, Nb, nUq, nUk] when every kernel block
    lies inside one of its blocks (then it decides whole kernel blocks), else None (folded into `dense_i8`)."""
    s_live, s_full = static_tables(lay.T, lay.S, lay.bq, lay.bk, lay.left, lay.right, lay.q_offset)
    live = jnp.asarray(s_live)[None, None]
    full = jnp.asarray(s_full)[None, None]
    r0 = jnp.arange(lay.nq) * lay.bq
    r1 = jnp.minimum(r0 + lay.bq, lay.T)  # end of the valid rows of each query block
    c0 = jnp.arange(lay.nk) * lay.bk
    c1 = c0 + lay.bk
    if mask.q_lengths is not None:
        ql = mask.q_lengths.astype(jnp.int32)[:, None, None, None]
        live &= (r0[:, None] < ql)
        full &= (r1[:, None] <= ql)
    if mask.kv_lengths is not None:
        kl = jnp.minimum(mask.kv_lengths.astype(jnp.int32), lay.S)[:, None, None, None]
        live &= (c0[None, :] < kl)
        full &= (c1[None, :] <= kl)
    if mask.q_segment_ids is not None:
        qs, ks = mask.q_segment_ids.astype(jnp.int32), mask.kv_segment_ids.astype(jnp.int32)
        big, small = jnp.iinfo(jnp.int32).max, jnp.iinfo(jnp.int32).min
        rows_ok = jnp.arange(lay.Tp) < lay.T
        cols_ok = jnp.arange(lay.Sp) < lay.S
        qs = jnp.pad(qs, ((0, 0), (0, lay.Tp - lay.T)))
        ks = jnp.pad(ks, ((0, 0), (0, lay.Sp - lay.S)))
        qmin = jnp.where(rows_ok, qs, big).reshape(-1, lay.nq, lay.bq).min(-1)
        qmax = jnp.where(rows_ok, qs, small).reshape(-1, lay.nq, lay.bq).max(-1)
        kmin = jnp.where(cols_ok, ks, big).reshape(-1, lay.nk, lay.bk).min(-1)
        kmax = jnp.where(cols_ok, ks, small).reshape(-1, lay.nk, lay.bk).max(-1)
        live &= ((qmin[:, :, None] <= kmax[:, None, :]) & (kmin[:, None, :] <= qmax[:, :, None]))[:, None]
        uniform = (qmin == qmax)[:, :, None] & (kmin == kmax)[:, None, :] & (qmin[:, :, None] == kmin[:, None, :])
        full &= uniform[:, None]
    if block_mask_nested is not None:
        bm = block_mask_nested
        ubq, ubk = mask.block_size
        iq = np.minimum(np.arange(lay.nq) * lay.bq // ubq, bm.shape[-2] - 1)
        ik = np.minimum(np.arange(lay.nk) * lay.bk // ubk, bm.shape[-1] - 1)
        live &= bm[:, :, iq][:, :, :, ik]
    if dense_i8 is not None:
        d = dense_i8 != 0
        blocks = d.reshape(d.shape[:2] + (lay.nq, lay.bq, lay.nk, lay.bk))
        live &= jnp.any(blocks, axis=(3, 5))
        rows_pad = (jnp.arange(lay.Tp) >= lay.T).reshape(1, 1, lay.nq, lay.bq, 1, 1)
        full &= jnp.all(blocks | rows_pad, axis=(3, 5))  # padding rows do not count; padding columns never full
    shape = (lay.Bl, lay.Nl, lay.nq, lay.nk)
    return jnp.broadcast_to(live, shape), jnp.broadcast_to(full & live, shape)


def block_lists(live: jax.Array, full: jax.Array, width: int):
    """bool [Bl, Nl, R, C] -> (entries int32 [Bl*Nl*R*width], counts int32 [Bl*Nl*R]), flattened for scalar
    memory. Entries of row r are 2 * c + needs_mask for its live columns c in increasing order, then repeats."""
    order = jnp.argsort(jnp.logical_not(live), axis=-1, stable=True)[..., :width].astype(jnp.int32)
    counts = jnp.sum(live, axis=-1, dtype=jnp.int32)
    pos = jnp.minimum(jnp.arange(width, dtype=jnp.int32), jnp.maximum(counts - 1, 0)[..., None])
    ids = jnp.take_along_axis(order, pos, axis=-1)
    needs_mask = jnp.logical_not(jnp.take_along_axis(full, ids, axis=-1)).astype(jnp.int32)
    return (2 * ids + needs_mask).reshape(-1), counts.reshape(-1)


def table_row(lay: Layout, b, n, r, rows: int):
    """Flat row index of (b, n, r) in a [Bl, Nl, rows] table (size-1 table axes are shared)."""
    bl = b if lay.Bl > 1 else 0
    nl = n if lay.Nl > 1 else 0
    return (bl * lay.Nl + nl) * rows + r


def fwd_inputs(lay: Layout, q, k, v, bias, aux):
    """(name, array, block shape, index map) of the operands of the grid (b, n, i, j) over query blocks i and the
    j-th entry of their key-block lists, shared by the forward and dQ kernels."""
    G = lay.G

    def kv_of(b, n, i, j, ents, cnts, lens):
        return entry_block(ents[table_row(lay, b, n, i, lay.nq) * lay.L + j])

    def bsel(x_b, size):
        return x_b if size > 1 else 0

    def kv_map(b, n, i, j, *s):
        return b, kv_head(n, G), kv_of(b, n, i, j, *s), 0

    specs = [("q", q, (None, None, lay.bq, lay.Hp), lambda b, n, i, j, *s: (b, n, i, 0)),
             ("k", k, (None, None, lay.bk, lay.Hp), kv_map),
             ("v", v, (None, None, lay.bk, lay.Vp), kv_map)]
    if bias is not None:
        Bb, Nb, Tb, Sb = bias.shape
        specs.append(("bias", bias, (None, None, lay.bq if Tb > 1 else 1, lay.bk if Sb > 1 else 1),
                      lambda b, n, i, j, *s: (bsel(b, Bb), bsel(n, Nb), bsel(i, Tb),
                                              kv_of(b, n, i, j, *s) if Sb > 1 else 0)))
    if lay.seg_B:
        Bs = lay.seg_B
        specs.append(("qseg", aux["qseg_lanes"], (None, lay.bq, LANES), lambda b, n, i, j, *s: (bsel(b, Bs), i, 0)))
        specs.append(("kseg", aux["kseg_rows"], (None, SUBLANES, lay.bk),
                      lambda b, n, i, j, *s: (bsel(b, Bs), 0, kv_of(b, n, i, j, *s))))
    if lay.dense_shape is not None:
        Bd, Nd = lay.dense_shape[:2]
        specs.append(("dense", aux["dense"], (None, None, lay.bq, lay.bk),
                      lambda b, n, i, j, *s: (bsel(b, Bd), bsel(n, Nd), i, kv_of(b, n, i, j, *s))))
    return specs


# ---- in-kernel pieces ---------------------------------------------------------------------------------------------
# Scalar index arithmetic uses shifts, masks and lax.div: jnp's floor division and remainder lower through sign
# tests that Mosaic's scalar core does not need (entries and head indices are never negative).
def entry_block(entry):
    """The block id of a list entry."""
    return lax.shift_right_logical(entry, jnp.int32(1))


def kv_head(n, G: int):
    """The key/value head read by query head n under GQA/MQA (n // G)."""
    return n if G == 1 else lax.div(n, jnp.int32(G))


def run_steps(lay: Layout, live, entry, step) -> None:
    """Run `step(masked)` on a live list entry: with the element-wise mask where the entry says the block needs
    it, without it on blocks the mask leaves entirely visible."""
    if not lay.elementwise:
        pl.when(live)(lambda: step(False))
        return
    masked = lax.bitwise_and(entry, jnp.int32(1)) == 1
    pl.when(live & masked)(lambda: step(True))
    pl.when(live & jnp.logical_not(masked))(lambda: step(False))


def widen(x: jax.Array, width: int) -> jax.Array:
    """A lane-replicated [rows, 128] statistic as [rows, width]: whole-vreg tiling when width is a multiple of 128
    (always on a real TPU), else a lane slice (small interpret-mode blocks)."""
    if width % LANES == 0:
        return jnp.tile(x, (1, width // LANES)) if width != LANES else x
    return x[:, :width]


def element_mask(lay: Layout, q_pos, k_pos, q_len, kv_len, seg_eq, dense_ok):
    """bool mask of one block in either orientation: `q_pos`/`k_pos` are int32 row/column indices broadcast to the
    block shape; q_len/kv_len scalars (kv_len already clipped to S); seg_eq/dense_ok precomputed or None."""
    ok = (k_pos < kv_len) & (q_pos < q_len)
    pos = q_pos + lay.q_offset
    if lay.left is not None:
        ok &= k_pos >= pos - lay.left
    if lay.right is not None:
        ok &= k_pos <= pos + lay.right
    if seg_eq is not None:
        ok &= seg_eq
    if dense_ok is not None:
        ok &= dense_ok
    return ok


def iotas(shape, row0, col0):
    """Absolute row and column indices of a block starting at (row0, col0)."""
    return (lax.broadcasted_iota(jnp.int32, shape, 0) + row0, lax.broadcasted_iota(jnp.int32, shape, 1) + col0)


def logits(lay: Layout, s_raw, bias_blk, b, n, q_pos, k_pos, derivative: bool = False):
    """float32 logits of a block in either orientation: scale·q·kᵀ (+ bias) -> soft cap -> score_mod(s, b, n, t, j)
    (the order of `common.apply_logit_mods`; q_pos/k_pos are the block's absolute query/key indices, int32 arrays
    of its shape). With `derivative`, also d logits / d(scale·q·kᵀ + bias) elementwise (None when it is 1), which
    turns dS of the final logits into the gradient of q·kᵀ and of the bias (and the tangent the other way)."""
    s = s_raw * lay.scale
    if bias_blk is not None:
        s = s + bias_blk.astype(F32)
    dsds = None
    if lay.cap is not None:
        t = jnp.tanh(s / lay.cap)
        s = lay.cap * t
        dsds = 1.0 - t * t if derivative else None
    if lay.score_mod is not None:
        s, dsds = score_mod_in_kernel(lay.score_mod, s, b, n, q_pos, k_pos, dsds, derivative)
    return s, dsds
