"""Forward-mode tangent kernel of the Pallas TPU flash attention (`pallas_tpu.py`).

With the primal output O and log-sum-exp L saved by the forward, P = exp(S - L) is exact per block, so the tangent
needs one pass over the forward's key-block lists (grid (B, N, query blocks, L), as the forward and dQ kernels) and
no online softmax. For tangents dQ, dK, dV, d bias of the inputs:

    dS = m'(z) · (scale · (dQ Kᵀ + Q dKᵀ) + d bias),   z = scale · Q Kᵀ + bias,  m = score_mod ∘ soft cap
    dL = rowsum(P ∘ dS),    dO = P dV + (P ∘ dS) V - O ∘ dL

(O = P V with dP = P ∘ (dS - dL)). Only the perturbed inputs' tangents are read. Sinks are folded in after the
kernel in plain JAX, whose autodiff carries the tangent through them.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from attnx.ops.softmax.pallas_tpu_blocks import (F32, LANES, NN, NT, Layout, element_mask, entry_block, fwd_inputs,
                                                  interpret_arg, iotas, logits, run_steps, table_row, widen)


def _tangent_kernel(ents, cnts, lens, *refs, lay: Layout, names: tuple):
    r = dict(zip(names, refs))
    b, n, i, j = (pl.program_id(a) for a in range(4))
    row = table_row(lay, b, n, i, lay.nq)
    entry = ents[row * lay.L + j]
    kv = entry_block(entry)
    acc, dl = r["acc"], r["dl"]

    @pl.when(j == 0)
    def _init():
        acc[...] = jnp.zeros(acc.shape, F32)
        dl[...] = jnp.zeros(dl.shape, F32)

    def step(masked: bool):
        q, k, v = r["q"][...], r["k"][...], r["v"][...]
        q_pos, k_pos = iotas((lay.bq, lay.bk), i * lay.bq, kv * lay.bk)
        s, dsds = logits(lay, lax.dot_general(q, k, NT, preferred_element_type=F32),
                         r["bias"][...] if "bias" in r else None, b, n, q_pos, k_pos, derivative=True)
        ds = jnp.zeros(s.shape, F32)
        if "tq" in r:
            ds = ds + lax.dot_general(r["tq"][...], k, NT, preferred_element_type=F32) * lay.scale
        if "tk" in r:
            ds = ds + lax.dot_general(q, r["tk"][...], NT, preferred_element_type=F32) * lay.scale
        if "tbias" in r:
            ds = ds + r["tbias"][...].astype(F32)
        if dsds is not None:
            ds = ds * dsds
        if masked:
            seg = (widen(r["qseg"][...], lay.bk) == r["kseg"][:1, :]) if "qseg" in r else None
            dense = (r["dense"][...].astype(jnp.int32) != 0) if "dense" in r else None
            ok = element_mask(lay, q_pos, k_pos, lens[2 * b], lens[2 * b + 1], seg, dense)
            s, ds = jnp.where(ok, s, -jnp.inf), jnp.where(ok, ds, 0.0)
        p = jnp.exp(s - r["lse"][0][:, None])
        pds = p * ds
        update = lax.dot_general(pds.astype(v.dtype), v, NN, preferred_element_type=F32)
        if "tv" in r:
            update = update + lax.dot_general(p.astype(v.dtype), r["tv"][...], NN, preferred_element_type=F32)
        acc[...] += update
        dl[...] += jnp.sum(pds, axis=-1, keepdims=True)

    live = j < cnts[row]
    run_steps(lay, live, entry, step)

    @pl.when(j == lay.L - 1)
    def _finish():
        o = r["o"][...].astype(F32)
        r["t_o"][...] = (acc[...] - o * widen(dl[...], lay.Vp)).astype(r["t_o"].dtype)
        r["t_lse"][...] = dl[...]


def tangent(lay: Layout, q, k, v, bias, aux, out, lse, t: dict):
    """(dO [B, N, Tp, Vp] in out's dtype, dL [B, N, Tp] float32) for the tangents `t` of the perturbed inputs among
    q, k, v, bias (kernel layout; absent = zero)."""
    specs = fwd_inputs(lay, q, k, v, bias, aux)
    by_name = {name: (shape, fn) for name, _, shape, fn in specs}
    specs += [("t" + name, x.astype({"q": q, "k": k, "v": v, "bias": bias}[name].dtype)) + by_name[name]
              for name, x in t.items()]
    lse_rows = jnp.where(jnp.isfinite(lse), lse, 0.0)[:, :, None, :]  # masked rows: every logit is -inf, P = 0
    specs += [("o", out, (None, None, lay.bq, lay.Vp), lambda b, n, i, j, *s: (b, n, i, 0)),
              ("lse", lse_rows, (None, None, 1, lay.bq), lambda b, n, i, j, *s: (b, n, 0, i))]
    names = tuple(s[0] for s in specs) + ("t_o", "t_lse", "acc", "dl")
    t_o, t_lse = pl.pallas_call(
        functools.partial(_tangent_kernel, lay=lay, names=names),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=3,
            grid=(lay.B, lay.N, lay.nq, lay.L),
            in_specs=[pl.BlockSpec(shape, fn) for _, _, shape, fn in specs],
            out_specs=[pl.BlockSpec((None, None, lay.bq, lay.Vp), lambda b, n, i, j, *s: (b, n, i, 0)),
                       pl.BlockSpec((None, None, lay.bq, LANES), lambda b, n, i, j, *s: (b, n, i, 0))],
            scratch_shapes=[pltpu.VMEM((lay.bq, lay.Vp), F32), pltpu.VMEM((lay.bq, LANES), F32)]),
        out_shape=[jax.ShapeDtypeStruct(out.shape, out.dtype),
                   jax.ShapeDtypeStruct((lay.B, lay.N, lay.Tp, LANES), F32)],
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")),
        interpret=interpret_arg(lay),
        name="attnx_flash_tangent",
    )(aux["ents"], aux["cnts"], aux["lens"], *[s[1] for s in specs])
    return t_o, t_lse[..., 0]
