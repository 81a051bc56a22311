"""Softmax flash attention as a Pallas TPU (Mosaic) kernel with block skipping: forward here, backward in
`pallas_tpu_backward.py`, block lists and in-kernel masks in `pallas_tpu_blocks.py`.

Algorithm: FlashAttention-2 (Dao, 2023, arXiv 2307.08691): Alg. 1 (online softmax over key blocks, one output
tile per query block) for the forward, Alg. 2 for the backward (dK/dV over key blocks, dQ over query blocks,
probabilities recomputed from the saved log-sum-exp). The design is splash attention's: the grid is
(B, N, query blocks, L) and its innermost ("arbitrary") axis walks a per-(batch, head, query block) list of key
blocks passed by scalar prefetch (`pltpu.PrefetchScalarGridSpec`): the key/value BlockSpecs read the block id from
the list, steps past the list's count compute nothing and, repeating the last id, copy nothing. Lists come from
causal/window/q_offset, lengths, segment ids, block masks and dense masks (`pallas_tpu_blocks.block_tables`);
element-wise masks apply only inside blocks that need them. GQA/MQA read key/value head n // G, never repeated.

Layout: the wrapper moves heads before sequence ([B, N, T, H]), pads sequences to whole blocks and head dims to
the 128-lane width; row statistics (m, l, lse) are kept lane-replicated [rows, 128] as Mosaic wants. Sinks are
folded in after the kernel (exactly: lse' = logaddexp(lse, sink), out' = out * exp(lse - lse')), so plain autodiff
gives their gradient (and tangent). Both modes (`attnx.ops.forward_mode`): `jax.grad` runs the backward kernels,
`jax.jvp` a tangent kernel (`pallas_tpu_tangent.py`) over the forward's block lists; in interpret mode with TPU
emulation (`pallas_tpu_blocks.EMULATE_TPU`) reverse mode only.

score_mod(s, b, n, t, j) is traced into every kernel body (t, j: the block's absolute query/key indices; it may
not close over arrays, as on GPU); its derivative in the backward and tangent kernels is a unit-tangent jvp.
Not supported (NotImplementedError from `check`): dtypes other than float32/bfloat16/float16. Memory beyond O(T): a dense mask, a `mask_mod` (evaluated in the wrapper into a dense
int8 mask) and a block mask whose blocks do not contain the kernel's blocks (expanded to elements) cost
O(B·N·T·S) bytes; bias gradients materialise dS [B, N, T, S] in float32. The forward writes its lse
lane-replicated ([B, N, T, 128] float32, as splash attention does) before slicing it. The block lists live in
scalar memory: 4·Bl·Nl·(nq·L + nk·Lt) bytes, with Bl = B only when lengths/segment ids/masks vary over the batch
and Nl = N only when a mask varies over heads; very long sequences with per-batch masks may not fit (not yet
measured on a TPU).

Block sizes: multiples of 128 on a TPU (lane width; the (1, block_q) log-sum-exp tiles need it); in interpret mode
any multiple of 8, so tests can use small blocks. A sequence shorter than a block uses one block of its (8-rounded)
length, which Mosaic accepts as a full-dimension block.
"""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from attnx.mask import Mask
from attnx.ops import forward_mode
from attnx.ops.softmax import common
from attnx.ops.softmax import pallas_tpu_backward as bwd_lib
from attnx.ops.softmax import pallas_tpu_tangent as tangent_lib
from attnx.ops.softmax.pallas_gpu import refuse_mod_constants
from attnx.ops.softmax.pallas_tpu_blocks import (F32, LANES, NN, NT, SUBLANES, Layout, block_lists,
                                                  block_tables, element_mask, entry_block, fwd_inputs,
                                                  interpret_arg, iotas, logits, run_steps, static_tables,
                                                  table_row, widen)
from attnx.validation import AttentionArgs

__all__ = ["check", "run"]

_DTYPES = ("float32", "bfloat16", "float16")


def check(args: AttentionArgs, return_lse: bool, cfg=None) -> None:
    """Raise NotImplementedError for arguments this kernel does not handle (the API then tries the next one);
    with the config, also when it would run neither on a TPU nor interpreted."""
    if cfg is not None and not _interpreting(cfg) and not _on_tpu():
        raise NotImplementedError(f"pallas_tpu: needs a TPU (backend is {jax.default_backend()}) or interpret "
                                  "mode (PallasTpu(interpret=True) or ATTNX_PALLAS_INTERPRET=1)")
    refuse_mod_constants("pallas_tpu", args.score_mod, None)
    if args.q.dtype.name not in _DTYPES:
        raise NotImplementedError(f"pallas_tpu: dtype {args.q.dtype} is not supported; allowed {list(_DTYPES)}")


def _interpreting(cfg) -> bool:
    if cfg.interpret is None:
        return os.environ.get("ATTNX_PALLAS_INTERPRET", "0") == "1"
    return bool(cfg.interpret)


def _on_tpu() -> bool:
    return jax.default_backend() == "tpu"


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


# ---- forward kernel ----------------------------------------------------------------------------------------------
def _fwd_kernel(ents, cnts, lens, *refs, lay: Layout, names: tuple):
    r = dict(zip(names, refs))
    b, n, i, j = (pl.program_id(a) for a in range(4))
    row = table_row(lay, b, n, i, lay.nq)
    entry = ents[row * lay.L + j]
    kv = entry_block(entry)
    m_sc, l_sc, acc_sc = r["m"], r["l"], r["acc"]

    @pl.when(j == 0)
    def _init():
        m_sc[...] = jnp.full(m_sc.shape, -jnp.inf, F32)
        l_sc[...] = jnp.zeros(l_sc.shape, F32)
        acc_sc[...] = jnp.zeros(acc_sc.shape, F32)

    def step(masked: bool):
        s = lax.dot_general(r["q"][...], r["k"][...], NT, preferred_element_type=F32)
        q_pos, k_pos = iotas((lay.bq, lay.bk), i * lay.bq, kv * lay.bk)
        s, _ = logits(lay, s, r["bias"][...] if "bias" in r else None, b, n, q_pos, k_pos)
        if masked:
            seg = (widen(r["qseg"][...], lay.bk) == r["kseg"][:1, :]) if "qseg" in r else None
            dense = (r["dense"][...].astype(jnp.int32) != 0) if "dense" in r else None
            ok = element_mask(lay, q_pos, k_pos, lens[2 * b], lens[2 * b + 1], seg, dense)
            s = jnp.where(ok, s, -jnp.inf)
        m_prev = m_sc[...]
        m_next = jnp.maximum(m_prev, jnp.max(s, axis=-1, keepdims=True))  # [bq, 128]
        # A row with nothing visible yet keeps m = -inf; shifting by 0 there keeps exp() NaN-free.
        m_safe = jnp.where(m_next == -jnp.inf, 0.0, m_next)
        p = jnp.exp(s - widen(m_safe, lay.bk))
        alpha = jnp.exp(m_prev - m_safe)
        l_sc[...] = alpha * l_sc[...] + jnp.sum(p, axis=-1, keepdims=True)
        m_sc[...] = m_next
        v = r["v"][...]
        pv = lax.dot_general(p.astype(v.dtype), v, NN, preferred_element_type=F32)
        acc_sc[...] = widen(alpha, lay.Vp) * acc_sc[...] + pv

    live = j < cnts[row]
    run_steps(lay, live, entry, step)

    @pl.when(j == lay.L - 1)
    def _finish():
        l = l_sc[...]
        seen = l > 0  # fully masked rows: output 0, lse -inf
        l_safe = jnp.where(seen, l, 1.0)
        r["o"][...] = (acc_sc[...] / widen(l_safe, lay.Vp)).astype(r["o"].dtype)
        r["lse"][...] = jnp.where(seen, m_sc[...] + jnp.log(l_safe), -jnp.inf)


def _forward(lay: Layout, q, k, v, bias, aux):
    specs = fwd_inputs(lay, q, k, v, bias, aux)
    names = tuple(s[0] for s in specs) + ("o", "lse", "m", "l", "acc")
    out_dtype = F32 if lay.out_f32 else q.dtype
    B, N = lay.B, lay.N
    out, lse = pl.pallas_call(
        functools.partial(_fwd_kernel, lay=lay, names=names),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=3,
            grid=(B, N, lay.nq, lay.L),
            in_specs=[pl.BlockSpec(shape, fn) for _, _, shape, fn in specs],
            out_specs=[pl.BlockSpec((None, None, lay.bq, lay.Vp), lambda b, n, i, j, *s: (b, n, i, 0)),
                       pl.BlockSpec((None, None, lay.bq, LANES), lambda b, n, i, j, *s: (b, n, i, 0))],
            scratch_shapes=[pltpu.VMEM((lay.bq, LANES), F32), pltpu.VMEM((lay.bq, LANES), F32),
                            pltpu.VMEM((lay.bq, lay.Vp), F32)]),
        out_shape=[jax.ShapeDtypeStruct((B, N, lay.Tp, lay.Vp), out_dtype),
                   jax.ShapeDtypeStruct((B, N, lay.Tp, LANES), F32)],
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")),
        interpret=interpret_arg(lay),
        name="attnx_flash_fwd",
    )(aux["ents"], aux["cnts"], aux["lens"], *[s[1] for s in specs])
    return out, lse[..., 0]


# ---- differentiation ---------------------------------------------------------------------------------------------
def _flash_forward(lay: Layout, diff: dict, aux: dict):
    return _forward(lay, diff["q"], diff["k"], diff["v"], diff.get("bias"), aux)


def _flash_tangent(lay: Layout, diff: dict, aux: dict, outs, t: dict):
    return tangent_lib.tangent(lay, diff["q"], diff["k"], diff["v"], diff.get("bias"), aux, *outs, t)


def _flash_backward(lay: Layout, diff: dict, aux: dict, outs, cts_and_names):
    (d_out, d_lse), names = cts_and_names
    q, k, v, bias = diff["q"], diff["k"], diff["v"], diff.get("bias")
    out, lse = outs
    # FlashAttention-2 Alg. 2's D = rowsum(dO * O); a cotangent on lse adds P * d_lse to dS, i.e. D - d_lse.
    di = jnp.sum(d_out.astype(F32) * out.astype(F32), axis=-1) - d_lse
    lse_safe = jnp.where(jnp.isfinite(lse), lse, 0.0)  # masked rows: every logit is -inf, so P = 0 anyway
    rows = lambda x: x[:, :, None, :]  # [B, N, 1, Tp]: lane-dense row vectors
    # dS [B, N, Tp, Sp] is written only when the bias is differentiated.
    bias_grad = bias is not None and "bias" in names
    dq, ds = bwd_lib.dq(lay, q, k, v, bias, aux, d_out.astype(q.dtype), rows(lse_safe), rows(di),
                        write_ds=bias_grad)
    dk, dv = bwd_lib.dkv(lay, q, k, v, bias, aux, d_out.astype(q.dtype), rows(lse_safe), rows(di))
    grads = dict(q=dq, k=dk, v=dv)
    if bias_grad:
        # Blocks no list visits were never written: keep only live ones, then reduce over broadcast axes.
        live = jnp.repeat(jnp.repeat(aux["live"], lay.bq, axis=2), lay.bk, axis=3)
        ds = jnp.where(live, ds, 0.0)
        axes = tuple(a for a in range(4) if bias.shape[a] == 1)
        grads["bias"] = jnp.sum(ds, axis=axes, keepdims=True).astype(bias.dtype)
    return {n: grads[n] for n in names}


# jax.grad: the dQ and dK/dV kernels; jax.jvp: the tangent kernel (attnx.ops.forward_mode). Under TPU emulation
# (interpret mode with pltpu.InterpretParams) the kernels carry io callbacks, which forward_mode's linear_call cannot
# lower: reverse mode only there (the generic interpreter, PallasTpu(interpret=True) with EMULATE_TPU off, has both).
_flash = forward_mode.differentiable(_flash_forward, _flash_tangent, _flash_backward,
                                     reverse_only=lambda lay: not isinstance(interpret_arg(lay), bool))


# ---- wrapper -----------------------------------------------------------------------------------------------------
def _pad_to(x, axis, size):
    if x.shape[axis] in (1, size):
        return x
    pad = [(0, 0)] * x.ndim
    pad[axis] = (0, size - x.shape[axis])
    return jnp.pad(x, pad)


def _element_block_mask(mask, T: int, S: int):
    """The user's block mask [Bb, Nb, nUq, nUk] at element level [Bb, Nb, T, S]."""
    ubq, ubk = mask.block_size
    bm = mask.block_mask
    rows = np.minimum(np.arange(T) // ubq, bm.shape[-2] - 1)
    cols = np.minimum(np.arange(S) // ubk, bm.shape[-1] - 1)
    return bm[:, :, rows][:, :, :, cols]


def _mask_mod_dense(mask_mod, B: int, T: int, S: int, N: int, K: int):
    """mask_mod evaluated on every (batch, head, row, column) [B|1, N|1, T, S]: the kernel reads it as a dense mask
    (its blocks are skipped where it is False throughout)."""
    G = N // K
    mm = common.mask_block(Mask(), mask_mod, (), jnp.arange(T)[:, None], jnp.arange(S)[None, :], K, G, B, T, S)
    mm = jnp.broadcast_to(mm, mm.shape[:3] + (T, S))  # [B|1, K|1, G|1, T, S]
    if mm.shape[1:3] != (1, 1):
        mm = jnp.broadcast_to(mm, (mm.shape[0], K, G, T, S))
    return mm.reshape(mm.shape[0], -1, T, S)


def _layout_and_aux(args: AttentionArgs, cfg, interpret: bool):
    B, T, N, H = args.q.shape
    _, S, K, V = args.v.shape
    mask = args.mask
    bq = min(cfg.block_q, _round_up(T, SUBLANES))
    bk = min(cfg.block_kv, _round_up(S, SUBLANES))
    nq, nk = -(-T // bq), -(-S // bk)
    Tp, Sp = nq * bq, nk * bk
    left, right = mask.effective_window
    s_live, _ = static_tables(T, S, bq, bk, left, right, mask.q_offset)
    L = max(1, int(s_live.sum(1).max()))
    Lt = max(1, int(s_live.sum(0).max()))

    # Element-level masks that are not a function of positions go into one int8 [Bd, Nd, Tp, Sp] array.
    nested = None
    dense = None
    if mask.block_mask is not None:
        ubq, ubk = mask.block_size
        if ubq % bq == 0 and ubk % bk == 0:
            nested = mask.block_mask  # every kernel block lies in one mask block: decided per block, no elements
        else:
            dense = _element_block_mask(mask, T, S)
    if mask.dense is not None:
        d = jnp.broadcast_to(mask.dense, mask.dense.shape[:2] + (T, S))
        dense = d if dense is None else (dense & d)
    if args.mask_mod is not None:
        d = _mask_mod_dense(args.mask_mod, B, T, S, N, K)
        dense = d if dense is None else (dense & d)
    dense_i8 = None
    if dense is not None:
        dense_i8 = jnp.pad(dense.astype(jnp.int8), ((0, 0), (0, 0), (0, Tp - T), (0, Sp - S)))

    aux = {}
    seg_B = 0
    if mask.q_segment_ids is not None:
        qs = jnp.pad(mask.q_segment_ids.astype(jnp.int32), ((0, 0), (0, Tp - T)))
        ks = jnp.pad(mask.kv_segment_ids.astype(jnp.int32), ((0, 0), (0, Sp - S)))
        seg_B = max(qs.shape[0], ks.shape[0])
        qs = jnp.broadcast_to(qs, (seg_B, Tp))
        ks = jnp.broadcast_to(ks, (seg_B, Sp))
        # Each id array in both layouts: lanes [Bs, len, 128] (a column per row) and rows [Bs, 8, len].
        aux["qseg_lanes"] = jnp.broadcast_to(qs[:, :, None], (seg_B, Tp, LANES))
        aux["qseg_rows"] = jnp.broadcast_to(qs[:, None, :], (seg_B, SUBLANES, Tp))
        aux["kseg_lanes"] = jnp.broadcast_to(ks[:, :, None], (seg_B, Sp, LANES))
        aux["kseg_rows"] = jnp.broadcast_to(ks[:, None, :], (seg_B, SUBLANES, Sp))

    q_len = jnp.full((B,), T, jnp.int32) if mask.q_lengths is None else jnp.broadcast_to(
        mask.q_lengths.astype(jnp.int32), (B,))
    kv_len = jnp.full((B,), S, jnp.int32) if mask.kv_lengths is None else jnp.broadcast_to(
        jnp.minimum(mask.kv_lengths.astype(jnp.int32), S), (B,))
    aux["lens"] = jnp.stack([q_len, kv_len], axis=-1).reshape(-1)

    batch_sizes = [x.shape[0] for x in (mask.q_lengths, mask.kv_lengths, mask.q_segment_ids, mask.kv_segment_ids,
                                        nested, dense_i8) if x is not None]
    head_sizes = [x.shape[1] for x in (nested, dense_i8) if x is not None]
    Bl = B if any(s > 1 for s in batch_sizes) else 1
    Nl = N if any(s > 1 for s in head_sizes) else 1
    bias = args.bias
    if bias is not None:
        bias = _pad_to(_pad_to(bias, 2, Tp), 3, Sp)
    elementwise = (left is not None or right is not None or Sp != S or mask.q_lengths is not None
                   or mask.kv_lengths is not None or seg_B > 0 or dense_i8 is not None)
    lay = Layout(B=B, T=T, S=S, N=N, K=K, H=H, V=V, Hp=_round_up(H, LANES), Vp=_round_up(V, LANES), bq=bq, bk=bk,
                 nq=nq, nk=nk, L=L, Lt=Lt, Bl=Bl, Nl=Nl, left=left, right=right, q_offset=mask.q_offset,
                 scale=args.scale, cap=args.logits_soft_cap, bias_shape=None if bias is None else bias.shape,
                 seg_B=seg_B, dense_shape=None if dense_i8 is None else dense_i8.shape, elementwise=elementwise,
                 out_f32=args.sinks is not None, interpret=interpret, score_mod=args.score_mod)
    live, full = block_tables(lay, mask, dense_i8, nested)
    aux["ents"], aux["cnts"] = block_lists(live, full, L)
    aux["ents_t"], aux["cnts_t"] = block_lists(jnp.swapaxes(live, 2, 3), jnp.swapaxes(full, 2, 3), Lt)
    if dense_i8 is not None:
        aux["dense"] = dense_i8
        aux["dense_t"] = jnp.swapaxes(dense_i8, 2, 3)
    if bias is not None:
        aux["live"] = live
    return lay, bias, aux


def run(args: AttentionArgs, cfg, return_lse: bool = False):
    """out [B, T, N, V] (and lse [B, T, N] float32) from canonical arguments; cfg is an `attnx.PallasTpu`."""
    check(args, return_lse)
    interpret = _interpreting(cfg)
    if not interpret:
        if not _on_tpu():
            raise NotImplementedError(f"pallas_tpu: needs a TPU (backend is {jax.default_backend()}) or interpret "
                                      "mode (PallasTpu(interpret=True) or ATTNX_PALLAS_INTERPRET=1)")
        for field in ("block_q", "block_kv"):
            if getattr(cfg, field) % LANES:
                raise ValueError(f"PallasTpu.{field}: on a TPU expected a multiple of {LANES} (lane width), got "
                                 f"{getattr(cfg, field)}; smaller multiples of 8 are for interpret mode only")
    lay, bias, aux = _layout_and_aux(args, cfg, interpret)
    B, T, N, H = args.q.shape

    def heads_first(x, length, width):
        return jnp.pad(jnp.swapaxes(x, 1, 2), ((0, 0), (0, 0), (0, length - x.shape[1]), (0, width - x.shape[3])))

    q = heads_first(args.q, lay.Tp, lay.Hp)
    k = heads_first(args.k, lay.Sp, lay.Hp)
    v = heads_first(args.v, lay.Sp, lay.Vp)
    diff = dict(q=q, k=k, v=v) if bias is None else dict(q=q, k=k, v=v, bias=bias)
    out, lse = _flash(lay, diff, aux)
    out = jnp.swapaxes(out[:, :, :T, :lay.V], 1, 2)  # [B, T, N, V]
    lse = jnp.swapaxes(lse[:, :, :T], 1, 2)  # [B, T, N]
    if args.sinks is not None:
        total = jnp.logaddexp(lse, args.sinks.astype(F32))
        out = out * jnp.exp(lse - total)[..., None]
        lse = total
    out = out.astype(args.q.dtype)
    return (out, lse) if return_lse else out
