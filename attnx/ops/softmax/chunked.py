"""Flash attention in plain JAX: online softmax over key blocks, O(T·block) memory, runs on any backend.

Algorithm: FlashAttention-2 (Dao, 2023, arXiv 2307.08691, Alg. 1) for the forward: an outer loop over query blocks
and, inside, a loop over only the key blocks that the mask can reach (static bounds from causal/window, dynamic
skipping of blocks that segment ids, lengths, block masks, dense masks or a `mask_mod` rule out entirely).

Derivatives: one `jax.custom_jvp` serves forward *and* reverse mode. Its tangent rule is itself chunked:

    dS = jvp of the logits (q, k, bias, soft cap, score_mod)   P = exp(S - lse)   (recomputed per block)
    c  = rowsum(P * dS) + P_sink * d_sink                      d_lse = c
    dO = (P * dS) @ V + P @ dV - c * O

written with `lax.scan` over blocks whose bodies are rematerialised (`jax.checkpoint`). `jax.jvp` runs it directly;
`jax.grad` linearises and transposes it, and the transpose of each block step is exactly FlashAttention-2's
backward (Alg. 2: dV += Pᵀ dO, dP = dO Vᵀ, dS = P (dP - rowsum(dO * O)), dQ += dS K, dK += dSᵀ Q) recomputing P
per block, so reverse mode also keeps O(T·block) memory. This departs from the issue's wording ("a custom_vjp")
on purpose: a custom_vjp would block `jax.jvp` (ARCHITECTURE §4).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.custom_derivatives import SymbolicZero

from attnx.mask import Mask
from attnx.ops.softmax import common
from attnx.ops.softmax.config import Chunked
from attnx.validation import AttentionArgs

F32 = jnp.float32


# ---- static geometry ---------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class _Geometry:
    """Block layout, fixed at trace time. lo/hi: the key-block range each query block can reach (from causal and
    window alone); span: the longest such range (the tangent scan's static length); full: blocks that causal,
    window and key padding leave entirely visible."""

    B: int
    T: int
    S: int
    N: int
    K: int
    H: int
    V: int
    bq: int
    bk: int
    nq: int
    nk: int
    nk_pad: int
    span: int
    lo: tuple
    hi: tuple
    full: tuple  # bool [nq][nk_pad], nested tuples so the geometry stays hashable

    @property
    def G(self):
        return self.N // self.K


def _geometry(args: AttentionArgs, cfg: Chunked) -> _Geometry:
    B, T, N, H = args.q.shape
    _, S, K, V = args.v.shape
    bq, bk = min(cfg.block_q, T), min(cfg.block_kv, S)
    nq, nk = -(-T // bq), -(-S // bk)
    left, right = args.mask.effective_window
    off = args.mask.q_offset
    lo, hi = [], []
    for i in range(nq):
        p_lo, p_hi = i * bq + off, min((i + 1) * bq, T) - 1 + off
        first = 0 if left is None else max(0, p_lo - left)
        last = S - 1 if right is None else min(S - 1, p_hi + right)
        if last < first:
            lo.append(0), hi.append(0)
        else:
            lo.append(first // bk), hi.append(last // bk + 1)
    span = max(1, max(h - l for l, h in zip(lo, hi)))
    nk_pad = max(nk, max(lo) + span)
    full = np.zeros((nq, nk_pad), dtype=bool)
    for i in range(nq):
        p_lo, p_hi = i * bq + off, min((i + 1) * bq, T) - 1 + off
        for j in range(lo[i], hi[i]):
            c_lo, c_hi = j * bk, (j + 1) * bk - 1
            ok = c_hi < S
            ok &= left is None or c_lo >= p_hi - left
            ok &= right is None or c_hi <= p_lo + right
            full[i, j] = ok
    full_t = tuple(tuple(bool(x) for x in row) for row in full)
    return _Geometry(B, T, S, N, K, H, V, bq, bk, nq, nk, nk_pad, span, tuple(lo), tuple(hi), full_t)


def _static_live(g: _Geometry) -> np.ndarray:
    live = np.zeros((g.nq, g.nk_pad), dtype=bool)
    for i in range(g.nq):
        live[i, g.lo[i]:g.hi[i]] = True
    return live


# ---- dynamic block liveness (computed outside the custom_jvp; integer/bool only) ---------------------------------
def _live_table(g: _Geometry, mask: Mask, mask_mod) -> jax.Array:
    """[nq, nk_pad] bool: False where a block is certainly fully masked for every batch element and head."""
    live = jnp.asarray(_static_live(g))
    rows = jnp.arange(g.nq * g.bq)
    cols = jnp.arange(g.nk_pad * g.bk)
    row_ok = rows < g.T
    col_ok = cols < g.S
    if mask.kv_lengths is not None:  # [B|1]
        col_any = jnp.any(cols[None, :] < mask.kv_lengths[:, None], axis=0) & col_ok
        live &= jnp.any(col_any.reshape(g.nk_pad, g.bk), axis=1)[None, :]
    if mask.q_lengths is not None:
        row_any = jnp.any(rows[None, :] < mask.q_lengths[:, None], axis=0) & row_ok
        live &= jnp.any(row_any.reshape(g.nq, g.bq), axis=1)[:, None]
    if mask.q_segment_ids is not None:
        dt = jnp.promote_types(mask.q_segment_ids.dtype, mask.kv_segment_ids.dtype)
        big = jnp.iinfo(dt).max  # sentinels of the ids' own dtype: no wrap-around that could hide a live block
        qs = jnp.pad(mask.q_segment_ids.astype(dt), ((0, 0), (0, g.nq * g.bq - g.T)), constant_values=0)
        ks = jnp.pad(mask.kv_segment_ids.astype(dt), ((0, 0), (0, g.nk_pad * g.bk - g.S)), constant_values=0)
        qmin = jnp.where(row_ok, qs, big).reshape(-1, g.nq, g.bq).min(-1)
        small = jnp.iinfo(dt).min
        qmax = jnp.where(row_ok, qs, small).reshape(-1, g.nq, g.bq).max(-1)
        kmin = jnp.where(col_ok, ks, big).reshape(-1, g.nk_pad, g.bk).min(-1)
        kmax = jnp.where(col_ok, ks, small).reshape(-1, g.nk_pad, g.bk).max(-1)
        overlap = (qmin[:, :, None] <= kmax[:, None, :]) & (kmin[:, None, :] <= qmax[:, :, None])
        live &= jnp.any(overlap, axis=0)
    if mask.block_mask is not None:
        ubq, ubk = mask.block_size
        bm = mask.block_mask  # [B|1, N|1, nUq, nUk]
        oq = np.zeros((g.nq, bm.shape[-2]), np.float32)
        for i in range(g.nq):
            r0, r1 = i * g.bq, min((i + 1) * g.bq, g.T) - 1
            oq[i, r0 // ubq: min(r1 // ubq, bm.shape[-2] - 1) + 1] = 1
        ok = np.zeros((g.nk_pad, bm.shape[-1]), np.float32)
        for j in range(g.nk_pad):
            c0, c1 = j * g.bk, min((j + 1) * g.bk, g.S) - 1
            if c0 < g.S:
                ok[j, c0 // ubk: min(c1 // ubk, bm.shape[-1] - 1) + 1] = 1
        any_bm = jnp.any(bm, axis=(0, 1)).astype(F32)
        live &= (jnp.asarray(oq) @ any_bm @ jnp.asarray(ok).T) > 0
    if mask.dense is not None:
        d = jnp.any(mask.dense, axis=(0, 1))  # [T|1, S]
        if d.shape[0] == 1:
            d = jnp.broadcast_to(d, (g.T, g.S))
        d = jnp.pad(d, ((0, g.nq * g.bq - g.T), (0, g.nk_pad * g.bk - g.S)))
        live &= jnp.any(d.reshape(g.nq, g.bq, g.nk_pad, g.bk), axis=(1, 3))
    if mask_mod is not None:
        # Evaluate mask_mod one (i, j) block at a time, only inside the static band [lo[i], lo[i] + span), so this
        # costs O(block) memory like the attention itself.
        b_idx, n_idx = common.batch_index(g.B), common.head_index(g.K, g.G)
        lo = jnp.asarray(g.lo, jnp.int32)

        def block_alive(i, j):
            q_idx = i * g.bq + jnp.arange(g.bq)[:, None]
            kv_idx = j * g.bk + jnp.arange(g.bk)[None, :]
            mm = jnp.asarray(mask_mod(b_idx, n_idx, q_idx, kv_idx), dtype=bool)
            return jnp.any(mm & (q_idx < g.T) & (kv_idx < g.S))

        def per_row_block(i):
            return lax.map(lambda t: block_alive(i, lo[i] + t), jnp.arange(g.span))

        band = lax.map(per_row_block, jnp.arange(g.nq))  # [nq, span]
        cols_of = lo[:, None] + jnp.arange(g.span)[None, :]
        alive = jnp.zeros((g.nq, g.nk_pad), bool).at[jnp.arange(g.nq)[:, None], cols_of].max(band)
        live &= alive
    return live


# ---- block-level pieces shared by the forward and the tangent rule ----------------------------------------------
class _Blocks:
    """Closes over the canonical arrays, padded to whole blocks, and serves per-block slices and masks."""

    def __init__(self, g: _Geometry, mask: Mask, score_mod, mask_mod, mask_consts, scale, cap):
        self.g, self.mask, self.score_mod, self.mask_mod = g, mask, score_mod, mask_mod
        self.mask_consts, self.scale, self.cap = mask_consts, scale, cap
        self.has_dynamic_mask = mask_mod is not None or mask.has_array_fields
        # numpy, made a JAX array where it is read: this object is a nondiff argument of the custom_jvp, so an
        # array built here would be a tracer of the caller's trace and leak into the rule's (grad inside lax.cond)
        self.full = np.array(g.full, dtype=bool)

    def logits(self, q_i, k_j, bias_ij, score_consts, i, j):
        """float32 [B, K, G, bq, bk] logits of query block i against key block j, modifiers applied."""
        g = self.g
        s = jnp.einsum("bkgqh,bksh->bkgqs", q_i, k_j, preferred_element_type=F32) * self.scale
        q_idx = i * g.bq + jnp.arange(g.bq)[:, None]
        kv_idx = j * g.bk + jnp.arange(g.bk)[None, :]
        return common.apply_logit_mods(s, bias_ij, self.cap, self.score_mod, score_consts,
                                       common.batch_index(g.B), common.head_index(g.K, g.G), q_idx, kv_idx)

    def allowed(self, i, j):
        """bool broadcastable to [B, K, G, bq, bk]: pairs of block (i, j) that may attend."""
        g = self.g
        q_idx = i * g.bq + jnp.arange(g.bq)[:, None]
        kv_idx = j * g.bk + jnp.arange(g.bk)[None, :]
        m = common.mask_block(self.mask, self.mask_mod, self.mask_consts, q_idx, kv_idx, g.K, g.G, g.B, g.T, g.S)
        in_range = (kv_idx < g.S)[None, None, None]
        return in_range if m is None else (m & in_range)

    def apply_mask(self, s, i, j):
        """Set excluded logits to -inf, skipping the work on blocks that are statically fully visible."""
        if self.has_dynamic_mask:
            return jnp.where(self.allowed(i, j), s, -jnp.inf)
        return lax.cond(jnp.asarray(self.full)[i, j], lambda s: s,
                        lambda s: jnp.where(self.allowed(i, j), s, -jnp.inf), s)


def _pad_axis(x, axis, size):
    if x is None or x.shape[axis] == size or x.shape[axis] == 1:
        return x
    pad = [(0, 0)] * x.ndim
    pad[axis] = (0, size - x.shape[axis])
    return jnp.pad(x, pad)


def _block(x, axis, index, size):
    """Slice block `index` of length `size` along `axis`, or pass a broadcast (size-1) axis through."""
    if x is None or x.shape[axis] == 1:
        return x
    return lax.dynamic_slice_in_dim(x, index * size, size, axis=axis)


# ---- forward -----------------------------------------------------------------------------------------------------
def _forward(g: _Geometry, blocks: _Blocks, q, k, v, bias, sinks, score_consts, live):
    """Online-softmax forward. q [B,K,G,Tp,H], k [B,K,Sp,H], v [B,K,Sp,V], bias [Bb,Kb,Gb,Tp|1,Sp|1] (padded).
    Returns out [B,K,G,Tp,V] float32 and lse [B,K,G,Tp] float32."""
    B, K, G = g.B, g.K, g.G
    lo = jnp.asarray(g.lo, jnp.int32)
    hi = jnp.asarray(g.hi, jnp.int32)
    q_blocks = jnp.moveaxis(q.reshape(B, K, G, g.nq, g.bq, g.H), 3, 0)

    def q_step(_, xs):
        i, q_i = xs
        bias_i = _block(bias, 3, i, g.bq)

        def kv_step(j, carry):
            def compute(carry):
                m, l, acc = carry
                k_j = lax.dynamic_slice_in_dim(k, j * g.bk, g.bk, axis=2)
                v_j = lax.dynamic_slice_in_dim(v, j * g.bk, g.bk, axis=2)
                s = blocks.logits(q_i, k_j, _block(bias_i, 4, j, g.bk), score_consts, i, j)
                s = blocks.apply_mask(s, i, j)
                m_new = jnp.maximum(m, jnp.max(s, axis=-1))
                m_safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
                p = jnp.exp(s - m_safe[..., None])
                alpha = jnp.exp(m - m_safe)
                pv = jnp.einsum("bkgqs,bksv->bkgqv", p.astype(v.dtype), v_j, preferred_element_type=F32)
                return m_new, l * alpha + jnp.sum(p, axis=-1), acc * alpha[..., None] + pv

            return lax.cond(live[i, j], compute, lambda c: c, carry)

        init = tuple(common.match_varying(z, q, k, v, bias, score_consts, live) for z in (
            jnp.full((B, K, G, g.bq), -jnp.inf, F32), jnp.zeros((B, K, G, g.bq), F32),
            jnp.zeros((B, K, G, g.bq, g.V), F32)))
        m, l, acc = lax.fori_loop(lo[i], hi[i], kv_step, init)
        if sinks is not None:
            sink = sinks.astype(F32).reshape(1, K, G, 1)
            m_fin = jnp.maximum(m, sink)
            scale_old = jnp.where(jnp.isfinite(m), jnp.exp(m - m_fin), 0.0)
            l = l * scale_old + jnp.exp(sink - m_fin)
            acc = acc * scale_old[..., None]
            m = m_fin
        safe_l = jnp.where(l > 0, l, 1.0)
        out = acc / safe_l[..., None]
        lse = jnp.where(l > 0, m + jnp.log(safe_l), -jnp.inf)
        return None, (out, lse)

    _, (out, lse) = lax.scan(q_step, None, (jnp.arange(g.nq), q_blocks))
    out = jnp.moveaxis(out, 0, 3).reshape(B, K, G, g.nq * g.bq, g.V)
    lse = jnp.moveaxis(lse, 0, 3).reshape(B, K, G, g.nq * g.bq)
    return out, lse


# ---- tangent rule ------------------------------------------------------------------------------------------------
def _is_zero(t) -> bool:
    return t is None or isinstance(t, SymbolicZero)


def _zero_tangent(p):
    p = jnp.asarray(p)
    if jnp.issubdtype(p.dtype, jnp.inexact):
        return jnp.zeros_like(p)
    return np.zeros(p.shape, dtype=jax.dtypes.float0)


def _tangent(g: _Geometry, blocks: _Blocks, primals, tangents, out, lse):
    """(d_out, d_lse) for the tangents of (q, k, v, bias, sinks, score_consts); see the module docstring."""
    q, k, v, bias, sinks, score_consts, live = primals
    dq, dk, dv, dbias, dsinks, dscore = tangents
    B, K, G = g.B, g.K, g.G
    use = dict(q=not _is_zero(dq), k=not _is_zero(dk), v=not _is_zero(dv), bias=not _is_zero(dbias),
               sinks=not _is_zero(dsinks), score=not all(_is_zero(t) for t in dscore))
    lo = jnp.asarray(g.lo, jnp.int32)
    # Inside a shard_map the accumulators must vary over the mesh axes the inputs vary over (common.match_varying);
    # made here, outside the checkpointed scan bodies, whose partial evaluation cannot take the cast of a constant.
    tangent_init = tuple(common.match_varying(z, primals, tangents, out, lse) for z in (
        jnp.zeros((B, K, G, g.bq, g.V), F32), jnp.zeros((B, K, G, g.bq), F32)))

    def split_rows(x):  # [..., Tp, X] -> [nq, ..., bq, X]
        return jnp.moveaxis(x.reshape(x.shape[:3] + (g.nq, g.bq) + x.shape[4:]), 3, 0)

    rows_bias = bias is not None and bias.shape[3] != 1
    xs = dict(i=jnp.arange(g.nq), q=split_rows(q), o=split_rows(out), lse=jnp.moveaxis(
        lse.reshape(B, K, G, g.nq, g.bq), 3, 0))
    if use["q"]:
        xs["dq"] = split_rows(dq)
    if rows_bias:
        xs["bias"] = split_rows(bias)
        if use["bias"]:
            xs["dbias"] = split_rows(dbias)

    def window(x, start, axis, broadcastable=False):
        """Key blocks [start, start + span) of x along `axis`, moved to a leading scan axis. A size-1 axis of a
        broadcastable operand (bias) is not windowed: None is returned and the caller uses the operand whole."""
        if x is None or (broadcastable and x.shape[axis] == 1):
            return None
        w = lax.dynamic_slice_in_dim(x, start * g.bk, g.span * g.bk, axis=axis)
        w = w.reshape(w.shape[:axis] + (g.span, g.bk) + w.shape[axis + 1:])
        return jnp.moveaxis(w, axis, 0)

    def q_step(_, x):
        i = x["i"]
        start = lo[i]
        bias_i = x.get("bias", bias)
        dbias_i = x.get("dbias", dbias if use["bias"] and not rows_bias else None)
        inner = dict(t=jnp.arange(g.span), k=window(k, start, 2), v=window(v, start, 2))
        if use["k"]:
            inner["dk"] = window(dk, start, 2)
        if use["v"]:
            inner["dv"] = window(dv, start, 2)
        if bias_i is not None:
            inner["bias"] = window(bias_i, start, 4, broadcastable=True)
            if use["bias"]:
                inner["dbias"] = window(dbias_i, start, 4, broadcastable=True)
        lse_i = x["lse"]
        lse_safe = jnp.where(jnp.isfinite(lse_i), lse_i, 0.0)

        def kv_step(carry, y):
            j = start + y["t"]

            def compute(carry):
                a, c = carry
                bias_ij = y["bias"] if y.get("bias") is not None else bias_i
                dbias_ij = y["dbias"] if y.get("dbias") is not None else dbias_i

                def logits_of(q_blk, k_blk, b_blk, consts):
                    return blocks.logits(q_blk, k_blk, b_blk, consts, i, j)

                primal_in = (x["q"], y["k"], bias_ij, score_consts)
                tangent_in = (x.get("dq"), y.get("dk"), dbias_ij, dscore if use["score"] else None)
                active = [n for n, t in enumerate(tangent_in) if t is not None]

                def partial_logits(*act):
                    full = list(primal_in)
                    for n, val in zip(active, act):
                        full[n] = val
                    return logits_of(*full)

                if use["score"]:
                    tangent_in = tangent_in[:3] + (tuple(
                        _zero_tangent(p) if _is_zero(t) else t for p, t in zip(score_consts, dscore)),)
                if active:
                    s, ds = jax.jvp(partial_logits, tuple(primal_in[n] for n in active),
                                    tuple(tangent_in[n] for n in active))
                else:
                    s, ds = logits_of(*primal_in), None
                allowed = blocks.allowed(i, j)
                p = jnp.where(allowed, jnp.exp(s - lse_safe[..., None]), 0.0)
                if ds is not None:
                    pds = p * jnp.where(allowed, ds, 0.0)
                    c = c + jnp.sum(pds, axis=-1)
                    a = a + jnp.einsum("bkgqs,bksv->bkgqv", pds, y["v"].astype(F32))
                if use["v"]:
                    a = a + jnp.einsum("bkgqs,bksv->bkgqv", p, y["dv"].astype(F32))
                return a, c

            return lax.cond(live[i, j], compute, lambda c: c, carry), None

        (a, c), _ = lax.scan(jax.checkpoint(kv_step), tangent_init, inner)
        if use["sinks"]:
            sink = sinks.astype(F32).reshape(1, K, G, 1)
            p_sink = jnp.where(jnp.isfinite(lse_i), jnp.exp(sink - lse_safe), 0.0)
            c = c + p_sink * dsinks.astype(F32).reshape(1, K, G, 1)
        d_out = a - c[..., None] * x["o"].astype(F32)
        return None, (d_out, c)

    _, (d_out, d_lse) = lax.scan(jax.checkpoint(q_step), None, xs)
    d_out = jnp.moveaxis(d_out, 0, 3).reshape(B, K, G, g.nq * g.bq, g.V)
    d_lse = jnp.moveaxis(d_lse, 0, 3).reshape(B, K, G, g.nq * g.bq)
    return d_out, d_lse


# ---- the custom_jvp core -----------------------------------------------------------------------------------------
@functools.partial(jax.custom_jvp, nondiff_argnums=(0, 1))
def _flash(g, blocks, q, k, v, bias, sinks, score_consts, live):
    return _forward(g, blocks, q, k, v, bias, sinks, score_consts, live)


@functools.partial(_flash.defjvp, symbolic_zeros=True)
def _flash_jvp(g, blocks, primals, tangents):
    # Through `_flash` (not `_forward`): an enclosing derivative (grad of grad, jacrev of jacrev) then meets this
    # custom rule again instead of the forward's dynamic-bound loop, which reverse mode cannot traverse.
    out, lse = _flash(g, blocks, *primals)
    dq, dk, dv, dbias, dsinks, dscore, _ = tangents
    d_out, d_lse = _tangent(g, blocks, primals, (dq, dk, dv, dbias, dsinks, tuple(dscore)), out, lse)
    return (out, lse), (d_out, d_lse)


def chunked_attention(args: AttentionArgs, cfg: Chunked | None = None, return_lse: bool = False):
    """out [B, T, N, V] (and lse [B, T, N] float32) from canonical arguments; see the module docstring."""
    cfg = cfg or Chunked()
    g = _geometry(args, cfg)
    B, K, G = g.B, g.K, g.G
    Tp, Sp = g.nq * g.bq, g.nk_pad * g.bk
    q = jnp.moveaxis(args.q.reshape(B, g.T, K, G, g.H), 1, 3)  # [B, K, G, T, H]
    q = _pad_axis(q, 3, Tp)
    k = _pad_axis(jnp.moveaxis(args.k, 1, 2), 2, Sp)  # [B, K, S, H]
    v = _pad_axis(jnp.moveaxis(args.v, 1, 2), 2, Sp)
    bias = common.group_heads(args.bias, K, G)
    bias = _pad_axis(_pad_axis(bias, 3, Tp), 4, Sp)

    # Closure-convert the user functions at the exact block shapes they will see, so that arrays they close over
    # (e.g. learnable slopes) become explicit inputs of the custom_jvp and receive gradients.
    b_idx, n_idx = common.batch_index(B), common.head_index(K, G)
    q_idx, kv_idx = jnp.arange(g.bq)[:, None], jnp.arange(g.bk)[None, :]
    s_example = jax.ShapeDtypeStruct((B, K, G, g.bq, g.bk), F32)
    score_mod, score_consts = None, ()
    if args.score_mod is not None:
        score_mod, score_consts = jax.closure_convert(args.score_mod, s_example, b_idx, n_idx, q_idx, kv_idx)
    mask_mod, mask_consts = None, ()
    if args.mask_mod is not None:
        mask_mod, mask_consts = jax.closure_convert(args.mask_mod, b_idx, n_idx, q_idx, kv_idx)
        mask_consts = tuple(lax.stop_gradient(c) for c in mask_consts)

    live = _live_table(g, args.mask, args.mask_mod)
    blocks = _Blocks(g, args.mask, score_mod, mask_mod, mask_consts, args.scale, args.logits_soft_cap)
    out, lse = _flash(g, blocks, q, k, v, bias, args.sinks, tuple(score_consts), live)
    out = jnp.moveaxis(out[:, :, :, :g.T], 3, 1).reshape(B, g.T, g.N, g.V).astype(args.q.dtype)
    if not return_lse:
        return out
    lse = jnp.moveaxis(lse[:, :, :, :g.T], 3, 1).reshape(B, g.T, g.N)
    return out, lse
