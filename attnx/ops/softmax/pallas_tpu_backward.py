"""Backward kernels of the Pallas TPU flash attention (`pallas_tpu.py`): FlashAttention-2's Alg. 2 (Dao, 2023,
arXiv 2307.08691, §3.1.2) split into two block-skipping kernels, as splash attention does:

    dQ   grid (B, N, query blocks, L):      walks the forward's key-block lists;
         dS = P * (dP - D), dQ += scale * dS K; also writes dS itself when a bias needs its gradient.
    dK/dV grid (B, K, key blocks, G, Lt):   walks the transposed lists (for each key block, the query blocks that
         reach it) of the G query heads sharing one key/value head, accumulating dV += Pᵀ dO, dK += scale * dSᵀ Q
         in VMEM, so GQA/MQA gradients are summed in the kernel, not over repeated copies.

P = exp(S - lse) is recomputed per block from the forward's log-sum-exp; D = rowsum(dO * O) - d_lse comes from the
wrapper. The dK/dV kernel works in the transposed orientation (keys on sublanes, queries on lanes) so that every
product is a plain or right-transposed matmul; its lse/D tiles are lane-dense row vectors [1, block_q].
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from attnx.ops.softmax.pallas_tpu_blocks import (F32, LANES, NN, NT, SUBLANES, Layout, element_mask,
                                                  entry_block, fwd_inputs, interpret_arg, iotas, logits,
                                                  run_steps, table_row, widen)


def _chain(ds, dsds, ok):
    """dS w.r.t. scale·q·kᵀ + bias from dS w.r.t. the final logits, through the soft cap and score_mod's elementwise
    derivative; masked entries are 0 (P is 0 there, but a mod's derivative may not be finite)."""
    if dsds is None:
        return ds
    ds = ds * dsds
    return ds if ok is None else jnp.where(ok, ds, 0.0)


# ---- dQ ----------------------------------------------------------------------------------------------------------
def _dq_kernel(ents, cnts, lens, *refs, lay: Layout, names: tuple):
    r = dict(zip(names, refs))
    b, n, i, j = (pl.program_id(a) for a in range(4))
    row = table_row(lay, b, n, i, lay.nq)
    entry = ents[row * lay.L + j]
    kv = entry_block(entry)
    acc = r["dq_acc"]

    @pl.when(j == 0)
    def _init():
        acc[...] = jnp.zeros(acc.shape, F32)

    def step(masked: bool):
        k = r["k"][...]
        q_pos, k_pos = iotas((lay.bq, lay.bk), i * lay.bq, kv * lay.bk)
        s, dsds = logits(lay, lax.dot_general(r["q"][...], k, NT, preferred_element_type=F32),
                         r["bias"][...] if "bias" in r else None, b, n, q_pos, k_pos, derivative=True)
        ok = None
        if masked:
            seg = (widen(r["qseg"][...], lay.bk) == r["kseg"][:1, :]) if "qseg" in r else None
            dense = (r["dense"][...].astype(jnp.int32) != 0) if "dense" in r else None
            ok = element_mask(lay, q_pos, k_pos, lens[2 * b], lens[2 * b + 1], seg, dense)
            s = jnp.where(ok, s, -jnp.inf)
        p = jnp.exp(s - r["lse"][0][:, None])
        dp = lax.dot_general(r["do"][...], r["v"][...], NT, preferred_element_type=F32)
        ds = _chain(p * (dp - r["di"][0][:, None]), dsds, ok)
        acc[...] += lax.dot_general(ds.astype(k.dtype), k, NN, preferred_element_type=F32)
        if "ds" in r:
            r["ds"][...] = ds

    live = j < cnts[row]
    run_steps(lay, live, entry, step)

    @pl.when(j == lay.L - 1)
    def _finish():
        r["dq"][...] = (acc[...] * lay.scale).astype(r["dq"].dtype)


def dq(lay: Layout, q, k, v, bias, aux, d_out, lse_rows, di_rows, write_ds: bool = True):
    """dQ [B, N, Tp, Hp] (q's dtype) and, with a bias and `write_ds`, dS [B, N, Tp, Sp] float32 (unvisited blocks
    unwritten; None otherwise)."""
    specs = fwd_inputs(lay, q, k, v, bias, aux)
    row_map = lambda b, n, i, j, *s: (b, n, 0, i)
    specs += [("do", d_out, (None, None, lay.bq, lay.Vp), lambda b, n, i, j, *s: (b, n, i, 0)),
              ("lse", lse_rows, (None, None, 1, lay.bq), row_map),
              ("di", di_rows, (None, None, 1, lay.bq), row_map)]
    write_ds = write_ds and bias is not None
    out_names = ("dq",) + (("ds",) if write_ds else ())
    names = tuple(s[0] for s in specs) + out_names + ("dq_acc",)
    out_specs = [pl.BlockSpec((None, None, lay.bq, lay.Hp), lambda b, n, i, j, *s: (b, n, i, 0))]
    out_shape = [jax.ShapeDtypeStruct(q.shape, q.dtype)]
    if write_ds:
        def ds_map(b, n, i, j, ents, cnts, lens):
            return b, n, i, entry_block(ents[table_row(lay, b, n, i, lay.nq) * lay.L + j])
        out_specs.append(pl.BlockSpec((None, None, lay.bq, lay.bk), ds_map))
        out_shape.append(jax.ShapeDtypeStruct((lay.B, lay.N, lay.Tp, lay.Sp), F32))
    res = pl.pallas_call(
        functools.partial(_dq_kernel, lay=lay, names=names),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=3,
            grid=(lay.B, lay.N, lay.nq, lay.L),
            in_specs=[pl.BlockSpec(shape, fn) for _, _, shape, fn in specs],
            out_specs=out_specs,
            scratch_shapes=[pltpu.VMEM((lay.bq, lay.Hp), F32)]),
        out_shape=out_shape,
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")),
        interpret=interpret_arg(lay),
        name="attnx_flash_bwd_dq",
    )(aux["ents"], aux["cnts"], aux["lens"], *[s[1] for s in specs])
    return res[0], (res[1] if write_ds else None)


# ---- dK / dV -----------------------------------------------------------------------------------------------------
def _dkv_kernel(ents, cnts, lens, *refs, lay: Layout, names: tuple):
    r = dict(zip(names, refs))
    b, kh, j, g, t = (pl.program_id(a) for a in range(5))
    n = kh * lay.G + g
    row = table_row(lay, b, n, j, lay.nk)
    entry = ents[row * lay.Lt + t]
    qi = entry_block(entry)
    dk_acc, dv_acc = r["dk_acc"], r["dv_acc"]

    @pl.when((g == 0) & (t == 0))
    def _init():
        dk_acc[...] = jnp.zeros(dk_acc.shape, F32)
        dv_acc[...] = jnp.zeros(dv_acc.shape, F32)

    def step(masked: bool):
        q, do = r["q"][...], r["do"][...]
        k_pos, q_pos = iotas((lay.bk, lay.bq), j * lay.bk, qi * lay.bq)
        s, dsds = logits(lay, lax.dot_general(r["k"][...], q, NT, preferred_element_type=F32),
                         r["bias"][...] if "bias" in r else None, b, n, q_pos, k_pos, derivative=True)  # [bk, bq]
        ok = None
        if masked:
            seg = (widen(r["kseg"][...], lay.bq) == r["qseg"][:1, :]) if "qseg" in r else None
            dense = (r["dense"][...].astype(jnp.int32) != 0) if "dense" in r else None
            ok = element_mask(lay, q_pos, k_pos, lens[2 * b], lens[2 * b + 1], seg, dense)
            s = jnp.where(ok, s, -jnp.inf)
        p = jnp.exp(s - r["lse"][...])  # lse [1, bq] broadcasts over the key rows
        dv_acc[...] += lax.dot_general(p.astype(do.dtype), do, NN, preferred_element_type=F32)
        dp = lax.dot_general(r["v"][...], do, NT, preferred_element_type=F32)
        ds = _chain(p * (dp - r["di"][...]), dsds, ok)
        dk_acc[...] += lax.dot_general(ds.astype(q.dtype), q, NN, preferred_element_type=F32)

    live = t < cnts[row]
    run_steps(lay, live, entry, step)

    @pl.when((g == lay.G - 1) & (t == lay.Lt - 1))
    def _finish():
        r["dk"][...] = (dk_acc[...] * lay.scale).astype(r["dk"].dtype)
        r["dv"][...] = dv_acc[...].astype(r["dv"].dtype)


def dkv(lay: Layout, q, k, v, bias, aux, d_out, lse_rows, di_rows):
    """dK [B, K, Sp, Hp] and dV [B, K, Sp, Vp] in the key/value dtypes."""
    G = lay.G

    def q_of(b, kh, j, g, t, ents, cnts, lens):
        return entry_block(ents[table_row(lay, b, kh * G + g, j, lay.nk) * lay.Lt + t])

    def sel(x, size):
        return x if size > 1 else 0

    specs = [("q", q, (None, None, lay.bq, lay.Hp),
              lambda b, kh, j, g, t, *s: (b, kh * G + g, q_of(b, kh, j, g, t, *s), 0)),
             ("k", k, (None, None, lay.bk, lay.Hp), lambda b, kh, j, g, t, *s: (b, kh, j, 0)),
             ("v", v, (None, None, lay.bk, lay.Vp), lambda b, kh, j, g, t, *s: (b, kh, j, 0)),
             ("do", d_out, (None, None, lay.bq, lay.Vp),
              lambda b, kh, j, g, t, *s: (b, kh * G + g, q_of(b, kh, j, g, t, *s), 0)),
             ("lse", lse_rows, (None, None, 1, lay.bq),
              lambda b, kh, j, g, t, *s: (b, kh * G + g, 0, q_of(b, kh, j, g, t, *s))),
             ("di", di_rows, (None, None, 1, lay.bq),
              lambda b, kh, j, g, t, *s: (b, kh * G + g, 0, q_of(b, kh, j, g, t, *s)))]
    if bias is not None:
        bias_t = jnp.swapaxes(bias, 2, 3)  # [Bb, Nb, Sp|1, Tp|1]: the block in the kernel's orientation
        Bb, Nb, Sb, Tb = bias_t.shape
        specs.append(("bias", bias_t, (None, None, lay.bk if Sb > 1 else 1, lay.bq if Tb > 1 else 1),
                      lambda b, kh, j, g, t, *s: (sel(b, Bb), sel(kh * G + g, Nb), sel(j, Sb),
                                                  q_of(b, kh, j, g, t, *s) if Tb > 1 else 0)))
    if lay.seg_B:
        Bs = lay.seg_B
        specs.append(("qseg", aux["qseg_rows"], (None, SUBLANES, lay.bq),
                      lambda b, kh, j, g, t, *s: (sel(b, Bs), 0, q_of(b, kh, j, g, t, *s))))
        specs.append(("kseg", aux["kseg_lanes"], (None, lay.bk, LANES),
                      lambda b, kh, j, g, t, *s: (sel(b, Bs), j, 0)))
    if lay.dense_shape is not None:
        Bd, Nd = lay.dense_shape[:2]
        specs.append(("dense", aux["dense_t"], (None, None, lay.bk, lay.bq),
                      lambda b, kh, j, g, t, *s: (sel(b, Bd), sel(kh * G + g, Nd), j, q_of(b, kh, j, g, t, *s))))
    names = tuple(s[0] for s in specs) + ("dk", "dv", "dk_acc", "dv_acc")
    out_map = lambda b, kh, j, g, t, *s: (b, kh, j, 0)
    return pl.pallas_call(
        functools.partial(_dkv_kernel, lay=lay, names=names),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=3,
            grid=(lay.B, lay.K, lay.nk, G, lay.Lt),
            in_specs=[pl.BlockSpec(shape, fn) for _, _, shape, fn in specs],
            out_specs=[pl.BlockSpec((None, None, lay.bk, lay.Hp), out_map),
                       pl.BlockSpec((None, None, lay.bk, lay.Vp), out_map)],
            scratch_shapes=[pltpu.VMEM((lay.bk, lay.Hp), F32), pltpu.VMEM((lay.bk, lay.Vp), F32)]),
        out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "parallel", "arbitrary", "arbitrary")),
        interpret=interpret_arg(lay),
        name="attnx_flash_bwd_dkv",
    )(aux["ents_t"], aux["cnts_t"], aux["lens"], *[s[1] for s in specs])
