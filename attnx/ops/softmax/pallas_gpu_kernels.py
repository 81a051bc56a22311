"""Pallas (Triton lowering) kernel bodies of block-skipping softmax flash attention: forward, dQ, dK/dV and the
forward-mode tangent.

FlashAttention-2 (Dao, 2023, arXiv 2307.08691): the forward is Alg. 1 (online softmax over key tiles, float32
statistics, one normalisation at the end), the backward Alg. 2 split into a dQ kernel (one program per query tile,
the forward's key list) and a dK/dV kernel (one program per key tile, looping over the query tiles of every query head
of its GQA group that can see it), with D = rowsum(dO * O) precomputed, so no atomics are needed and the result is
deterministic by construction.

Every kernel visits only the tiles of a precomputed list (`block_list.lists`): `[n_full, n_live, ids...]`, tile
`ids_ref[2 + t]`. The first n_full tiles are entirely allowed and run without any mask; on the partial ones the
element-wise mask (causal/window diagonal, lengths and the ragged tail, segment ids, a dense mask, mask_mod) is
applied with `jnp.where` on iotas.

Layouts (prepared by `pallas_gpu.py`): q/dO [B, K, G·Tp, Hp|Vp] (query head n = k·G + g owns rows g·Tp ...), k/v
[B, K, Sp, Hp|Vp], lse/delta [B, K, G·Tp], segment ids [B|1, Tp|Sp], bias [B|1, N|1, Tp, Sp], dense int8
[B|1, N|1, Tp, Sp], lengths [B] int32, sinks [N] float32. Refs arrive as a dict by name (`Meta.in_names`).
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from attnx.ops.softmax.common import score_mod_in_kernel

F32 = jnp.float32
NEG_INF = float("-inf")


@dataclasses.dataclass(frozen=True)
class Meta:
    """Static description of one call (hashable: it is a nondiff argument of the custom_jvp)."""

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
    scale: float
    cap: float | None
    left: int | None
    right: int | None
    q_offset: int
    has_seg: bool
    seg_batched: bool
    bias_dims: tuple[bool, bool] | None   # (varies over B, varies over N), None without bias
    dense_dims: tuple[bool, bool] | None
    has_sinks: bool
    score_mod: Callable | None
    mask_mod: Callable | None
    num_warps: int
    num_stages: int
    interpret: bool
    bias_grad: bool = True   # the dQ kernel writes dS (the bias gradient) when there is a bias and this is set

    @property
    def G(self) -> int:
        return self.N // self.K

    @property
    def nq(self) -> int:
        return -(-self.T // self.bq)

    @property
    def nk(self) -> int:
        return -(-self.S // self.bk)

    @property
    def Tp(self) -> int:
        return self.nq * self.bq

    @property
    def Sp(self) -> int:
        return self.nk * self.bk



def _dot(a, b, trans_a: bool = False, trans_b: bool = False):
    """Triton dot with float32 accumulation; float32 operands at full IEEE precision. Without `HIGHEST` the GPU runs
    float32 dots as TF32 (10-bit mantissa): measured on an H200, 1.6e-3 off the reference, 80x the float32
    tolerance. bfloat16/float16 operands are unaffected."""
    full = a.dtype == jnp.float32 and b.dtype == jnp.float32
    return plgpu.dot(a, b, trans_a=trans_a, trans_b=trans_b, precision=lax.Precision.HIGHEST if full else None)

def tile_logits(meta: Meta, q, k, bias, b, n, rows, cols, derivative: bool = False):
    """float32 [bq, bk] logits: scale·q·kᵀ (+ bias) -> soft cap -> score_mod(s, b, n, t, j) (the order of
    `common.apply_logit_mods`). With `derivative`, also d logits / d(scale·q·kᵀ + bias) elementwise (None when it
    is 1), which turns dS of the final logits into the gradient of q·kᵀ and of the bias."""
    s = _dot(q, k, trans_b=True) * meta.scale
    if bias is not None:
        s = s + bias.astype(F32)
    dsds = None
    if meta.cap is not None:
        t = jnp.tanh(s / meta.cap)
        s = meta.cap * t
        dsds = 1.0 - t * t
    if meta.score_mod is not None:
        s, dsds = score_mod_in_kernel(meta.score_mod, s, b, n, rows[:, None], cols[None, :], dsds, derivative)
    return s, dsds


def tile_allowed(meta: Meta, rows, cols, qlen, kvlen, qseg, kseg, dense, b, n):
    """bool [bq, bk]: pairs of the tile that may attend. rows [bq], cols [bk] are absolute indices; padded keys
    (cols >= S, the ragged tail) fail `cols < kvlen` because kvlen <= S."""
    r, c = rows[:, None], cols[None, :]
    allowed = (r < qlen) & (c < kvlen)
    pos = r + meta.q_offset
    if meta.left is not None:
        allowed = allowed & (c >= pos - meta.left)
    if meta.right is not None:
        allowed = allowed & (c <= pos + meta.right)
    if qseg is not None:
        allowed = allowed & (qseg[:, None] == kseg[None, :])
    if dense is not None:
        allowed = allowed & (dense != 0)
    if meta.mask_mod is not None:
        allowed = allowed & jnp.asarray(meta.mask_mod(b, n, r, c), dtype=bool)
    return allowed


def key_tile_allowed(meta: Meta, r: dict, rows, cols, col_idx, qlen, kvlen, qseg, b, n):
    """`tile_allowed` for a query-tile program (forward, dQ, tangent) at key slice `cols` (absolute `col_idx`),
    reading that slice's key segment ids and dense-mask columns from the refs."""
    return tile_allowed(meta, rows, col_idx, qlen, kvlen, qseg, r["kseg"][cols] if meta.has_seg else None,
                        r["dense"][:, cols] if meta.dense_dims is not None else None, b, n)


def _two_phase(ids, body, carry):
    """Run body(masked, t, carry) over a list [n_full, n_live, ids...]: the full tiles without the element-wise
    mask, then the partial ones with it (two loops rather than a branch per tile, as FlashAttention-2 separates
    the causal diagonal)."""
    carry = lax.fori_loop(0, ids[0], lambda t, c: body(False, t, c), carry)
    return lax.fori_loop(ids[0], ids[1], lambda t, c: body(True, t, c), carry)


def _head_index(dims, value):
    return value if dims else 0


def forward_kernel(meta: Meta, in_names: tuple[str, ...], *refs):
    """Grid (B, N, nq): one query tile of one head; Alg. 1 over the tile's key list."""
    r = dict(zip(in_names, refs))
    o_ref, lse_ref = refs[len(in_names):]
    b, n, i = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    bq, bk = meta.bq, meta.bk
    q = r["q"][...]
    rows = i * bq + jnp.arange(bq)
    qlen, kvlen = r["qlen"][b], r["kvlen"][b]
    qseg = r["qseg"][...] if meta.has_seg else None
    ids = r["ids"]

    def body(masked, t, carry):
        m, l, acc = carry
        start = pl.multiple_of(ids[t + 2] * bk, bk)
        cols = pl.ds(start, bk)
        k = r["k"][cols, :]
        v = r["v"][cols, :]
        bias = r["bias"][:, cols] if meta.bias_dims is not None else None
        col_idx = start + jnp.arange(bk)
        s, _ = tile_logits(meta, q, k, bias, b, n, rows, col_idx)
        if masked:
            allowed = key_tile_allowed(meta, r, rows, cols, col_idx, qlen, kvlen, qseg, b, n)
            s = jnp.where(allowed, s, NEG_INF)
        m_new = jnp.maximum(m, jnp.max(s, axis=1))
        # A row with nothing allowed so far keeps m = -inf; shift by 0 then so that exp never sees -inf - -inf.
        m_use = jnp.where(m_new == NEG_INF, 0.0, m_new)
        p = jnp.exp(s - m_use[:, None])
        alpha = jnp.exp(m - m_use)
        acc = acc * alpha[:, None] + _dot(p.astype(v.dtype), v)
        return m_new, l * alpha + jnp.sum(p, axis=1), acc

    init = (jnp.full((bq,), NEG_INF, F32), jnp.zeros((bq,), F32), jnp.zeros((bq, meta.Vp), F32))
    m, l, acc = _two_phase(ids, body, init)
    if meta.has_sinks:
        # The sink is a virtual key of value 0: it joins the denominator only.
        sink = r["sinks"][n]
        m_fin = jnp.maximum(m, sink)
        rescale = jnp.exp(m - m_fin)
        l = l * rescale + jnp.exp(sink - m_fin)
        acc = acc * rescale[:, None]
        m = m_fin
    safe_l = jnp.where(l > 0, l, 1.0)
    o_ref[...] = (acc / safe_l[:, None]).astype(o_ref.dtype)
    lse_ref[...] = jnp.where(l > 0, m + jnp.log(safe_l), NEG_INF)


def _probabilities_and_ds(meta, q, k, v, do, lse, delta, bias, b, n, rows, cols, allowed):
    """P and dS (w.r.t. scale·q·kᵀ + bias, i.e. also the bias gradient) of one tile. `lse` is +inf on rows
    without any allowed key, so their P is exactly 0."""
    s, dsds = tile_logits(meta, q, k, bias, b, n, rows, cols, derivative=True)
    if allowed is not None:
        s = jnp.where(allowed, s, NEG_INF)
    p = jnp.exp(s - lse[:, None])
    dp = _dot(do, v, trans_b=True)
    ds = p * (dp - delta[:, None])
    if dsds is not None:
        ds = ds * dsds if allowed is None else jnp.where(allowed, ds * dsds, 0.0)
    return p, ds


def dq_kernel(meta: Meta, in_names: tuple[str, ...], *refs):
    """Grid (B, N, nq): dQ of one query tile over the forward's key list (Alg. 2, lines for dQ); also writes the
    tile row of dS when there is a bias (its gradient, reduced over broadcast axes in the wrapper)."""
    r = dict(zip(in_names, refs))
    outs = refs[len(in_names):]
    dq_ref = outs[0]
    dbias_ref = outs[1] if meta.bias_dims is not None and meta.bias_grad else None
    b, n, i = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    bq, bk = meta.bq, meta.bk
    q, do = r["q"][...], r["do"][...]
    lse, delta = r["lse"][...], r["delta"][...]
    rows = i * bq + jnp.arange(bq)
    qlen, kvlen = r["qlen"][b], r["kvlen"][b]
    qseg = r["qseg"][...] if meta.has_seg else None
    ids = r["ids"]
    if dbias_ref is not None:
        # Tiles that are never visited have dS = 0; the output is not zero-initialised.
        def zero(j, c):
            dbias_ref[:, pl.ds(pl.multiple_of(j * bk, bk), bk)] = jnp.zeros((bq, bk), F32)
            return c
        lax.fori_loop(0, meta.nk, zero, 0)

    def body(masked, t, dq):
        start = pl.multiple_of(ids[t + 2] * bk, bk)
        cols = pl.ds(start, bk)
        k, v = r["k"][cols, :], r["v"][cols, :]
        bias = r["bias"][:, cols] if meta.bias_dims is not None else None
        col_idx = start + jnp.arange(bk)
        allowed = None
        if masked:
            allowed = key_tile_allowed(meta, r, rows, cols, col_idx, qlen, kvlen, qseg, b, n)
        _, ds = _probabilities_and_ds(meta, q, k, v, do, lse, delta, bias, b, n, rows, col_idx, allowed)
        if dbias_ref is not None:
            dbias_ref[:, cols] = ds
        return dq + _dot(ds.astype(k.dtype), k)

    dq = _two_phase(ids, body, jnp.zeros((bq, meta.Hp), F32))
    dq_ref[...] = dq * meta.scale


def dkv_kernel(meta: Meta, in_names: tuple[str, ...], *refs):
    """Grid (B, K, nk): dK and dV of one key tile of one key/value head, summed over the (query head, query tile)
    pairs of its transposed list, entry e = g·nq + i (Alg. 2, lines for dK/dV); each output tile has one writer."""
    r = dict(zip(in_names, refs))
    dk_ref, dv_ref = refs[len(in_names):]
    b, kh, j = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    bq, bk, nq = meta.bq, meta.bk, meta.nq
    k, v = r["k"][...], r["v"][...]
    cols = j * bk + jnp.arange(bk)
    qlen, kvlen = r["qlen"][b], r["kvlen"][b]
    kseg = r["kseg"][...] if meta.has_seg else None
    ids = r["ids"]

    def body(masked, t, carry):
        dk, dv = carry
        e = ids[t + 2]
        g = lax.div(e, nq)  # e >= 0; lax.div avoids floor_divide's sign fix-up in the Triton lowering
        i = e - g * nq
        n = kh * meta.G + g
        # Row e·bq of the [G·Tp] layout is row i·bq of head g.
        rsl = pl.ds(pl.multiple_of(e * bq, bq), bq)
        tsl = pl.ds(pl.multiple_of(i * bq, bq), bq)
        q, do = r["q"][rsl, :], r["do"][rsl, :]
        lse, delta = r["lse"][rsl], r["delta"][rsl]
        bias = (r["bias"][_head_index(meta.bias_dims[1], n), tsl, :]
                if meta.bias_dims is not None else None)
        dense = (r["dense"][_head_index(meta.dense_dims[1], n), tsl, :]
                 if meta.dense_dims is not None else None)
        rows = i * bq + jnp.arange(bq)
        allowed = None
        if masked:
            allowed = tile_allowed(meta, rows, cols, qlen, kvlen, r["qseg"][tsl] if meta.has_seg else None, kseg,
                                   dense, b, n)
        p, ds = _probabilities_and_ds(meta, q, k, v, do, lse, delta, bias, b, n, rows, cols, allowed)
        dv = dv + _dot(p.astype(do.dtype), do, trans_a=True)
        dk = dk + _dot(ds.astype(q.dtype), q, trans_a=True)
        return dk, dv

    dk, dv = _two_phase(ids, body, (jnp.zeros((bk, meta.Hp), F32), jnp.zeros((bk, meta.Vp), F32)))
    dk_ref[...] = dk * meta.scale
    dv_ref[...] = dv


def tangent_kernel(meta: Meta, in_names: tuple[str, ...], *refs):
    """Grid (B, N, nq): forward-mode tangent of one query tile over the forward's key list, from the primal output
    O and lse (one pass, no online softmax: P = exp(S - lse) is exact). With dS the tangent of the logits,
        dO = P·dV + (P∘dS)·V - O·dL,    dL = rowsum(P∘dS) (+ P_sink·d sink),
    the derivative of O = P·V with dP = P∘(dS - dL). dS = scale·(dQ·Kᵀ + Q·dKᵀ) + d bias, through the soft cap and
    score_mod by their elementwise derivative (`tile_logits(derivative=True)`)."""
    r = dict(zip(in_names, refs))
    to_ref, tlse_ref = refs[len(in_names):]
    b, n, i = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    bq, bk = meta.bq, meta.bk
    q, lse = r["q"][...], r["lse"][...]
    tq = r["tq"][...] if "tq" in r else None
    rows = i * bq + jnp.arange(bq)
    qlen, kvlen = r["qlen"][b], r["kvlen"][b]
    qseg = r["qseg"][...] if meta.has_seg else None
    ids = r["ids"]

    def body(masked, t, carry):
        acc, dl = carry
        start = pl.multiple_of(ids[t + 2] * bk, bk)
        cols = pl.ds(start, bk)
        k, v = r["k"][cols, :], r["v"][cols, :]
        bias = r["bias"][:, cols] if meta.bias_dims is not None else None
        col_idx = start + jnp.arange(bk)
        s, dsds = tile_logits(meta, q, k, bias, b, n, rows, col_idx, derivative=True)
        # Only the perturbed inputs' tangents are passed (the others are zero).
        ds = jnp.zeros((bq, bk), F32)
        if tq is not None:
            ds = ds + _dot(tq, k, trans_b=True) * meta.scale
        if "tk" in r:
            ds = ds + _dot(q, r["tk"][cols, :], trans_b=True) * meta.scale
        if "tbias" in r:
            ds = ds + r["tbias"][:, cols].astype(F32)
        if dsds is not None:
            ds = ds * dsds
        if masked:
            allowed = key_tile_allowed(meta, r, rows, cols, col_idx, qlen, kvlen, qseg, b, n)
            s = jnp.where(allowed, s, NEG_INF)
            ds = jnp.where(allowed, ds, 0.0)  # a masked logit may have an infinite derivative (0 * inf)
        p = jnp.exp(s - lse[:, None])
        pds = p * ds
        acc = acc + _dot(pds.astype(v.dtype), v)
        if "tv" in r:
            acc = acc + _dot(p.astype(v.dtype), r["tv"][cols, :])
        return acc, dl + jnp.sum(pds, axis=1)

    acc, dl = _two_phase(ids, body, (jnp.zeros((bq, meta.Vp), F32), jnp.zeros((bq,), F32)))
    if "tsinks" in r:
        # The sink is a logit of a zero value: it moves the normaliser only.
        p_sink = jnp.exp(r["sinks"][n] - lse)
        dl = dl + p_sink * r["tsinks"][n]
    to_ref[...] = (acc - r["out"][...].astype(F32) * dl[:, None]).astype(to_ref.dtype)
    tlse_ref[...] = dl
