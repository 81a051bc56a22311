"""Pallas GPU (Triton lowering) softmax flash attention with block skipping, forward and backward.

FlashAttention-2 (Dao, 2023, arXiv 2307.08691): forward Alg. 1, backward Alg. 2, and a forward-mode tangent kernel
(kernels in `pallas_gpu_kernels.py`), tied together by `attnx.ops.forward_mode.differentiable`: `jax.jvp` runs the
tangent kernel, `jax.grad` the backward kernels. What this wrapper does around the kernels:

- layout: heads-major, GQA groups stacked on the query axis ([B, K, G·Tp, H]) so the kernel for query head n reads
  key/value head n // G and keys/values are never repeated;
- any length and head dim: T, S are padded to whole tiles and H, V to a power of two >= 16 (Triton's dot limits);
  padded keys are masked inside the kernel (`col < kv_length`, kv_length <= S), so results are exact for lengths
  that are not multiples of the tile (the padded zero keys would otherwise take softmax mass);
- block skipping: `block_list.live_blocks` turns causal/window, lengths, segment ids, an aligned block mask, a
  dense mask and mask_mod into a tile table, compacted into per-(b, n, query tile) key lists for the forward and dQ
  kernels and per-(b, k, key tile) (head, query tile) lists for dK/dV. Tiles that are ruled out are never loaded or
  computed; tiles that are entirely allowed (`block_list.full_blocks`) run without the element-wise mask.
- memory beyond the inputs: O(B·N·nq·nk) int32 lists; a block mask whose block size is not a multiple of the tile
  is materialised as an element mask (int8 [B|1, N|1, T, S]), as is a dense mask; with a bias, its gradient is
  formed as [B, N, T, S] float32 before the sum over its broadcast axes.

Gradients: q, k, v, bias (dS summed over its broadcast axes), sinks (-Σ P_sink·(D - dlse), from lse in the wrapper)
and the lse cotangent (it enters as D - dlse). Forward mode (`jax.jvp`): one more kernel pass over the forward's
key lists computes the tangents of the output and lse from the primal output and lse (`tangent_kernel`); the
derivatives of derivatives (e.g. `jax.jvp` of `jax.grad`) are not available.
score_mod(s, b, n, t, j) and mask_mod(b, n, t, j) are traced into the kernel body (b, n scalars, t [bq, 1] and
j [1, bk] absolute indices); to lower to Triton they must use elementwise jnp only (no gathers), and they may not
close over arrays (refused by `refuse_mod_constants`: a kernel body cannot capture them, nor would their
gradients be computed). mask_mod takes part in block skipping (evaluated tile by tile in the wrapper).
Not supported (`check` raises NotImplementedError): head dims > 256, float64.
"""

from __future__ import annotations

import dataclasses
import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from attnx.mask import Mask
from attnx.ops import forward_mode
from attnx.ops.softmax import block_list as bl
from attnx.ops.softmax import pallas_gpu_kernels as kern
from attnx.ops.softmax.config import PallasGpu
from attnx.validation import AttentionArgs

__all__ = ["check", "run", "block_sparse_attention", "block_list_from_mask"]

F32 = jnp.float32
MAX_HEAD_DIM = 256
block_list_from_mask = bl.block_list_from_mask


def _backend() -> str:
    # One place to read the backend, so a test can lower the kernels for CUDA on a CPU-only machine.
    return jax.default_backend()


def resolve_interpret(interpret: bool | None) -> bool:
    return os.environ.get("ATTNX_PALLAS_INTERPRET") == "1" if interpret is None else bool(interpret)


def check(args: AttentionArgs, return_lse: bool, cfg: PallasGpu | None = None) -> None:
    """Raise NotImplementedError (saying why) for what the kernel does not run."""
    refuse_mod_constants("pallas_gpu", args.score_mod, args.mask_mod)
    H, V = args.q.shape[-1], args.v.shape[-1]
    if max(H, V) > MAX_HEAD_DIM:
        raise NotImplementedError(f"pallas_gpu: head dims up to {MAX_HEAD_DIM} (got H={H}, V={V})")
    if args.q.dtype not in (jnp.float32, jnp.bfloat16, jnp.float16):
        raise NotImplementedError(f"pallas_gpu: dtypes float32/bfloat16/float16, got {args.q.dtype}")
    # The backend test needs the config's `interpret` (the dispatcher and `explain` pass it).
    if cfg is not None and not resolve_interpret(cfg.interpret) and _backend() != "gpu":
        raise NotImplementedError(f"pallas_gpu: needs a GPU (backend is {_backend()}); pass "
                                  "attnx.PallasGpu(interpret=True) or set ATTNX_PALLAS_INTERPRET=1 to interpret it")


def refuse_mod_constants(owner: str, score_mod, mask_mod) -> None:
    """score_mod/mask_mod are traced into the kernel body with scalar b, n and index arrays t, j. Arrays they close
    over (traced ones, which would need gradients, or concrete tables, which a kernel body cannot capture) would
    have to be kernel inputs: refused here, naming the fix, so that a list of implementations falls through."""
    i32 = jax.ShapeDtypeStruct((), jnp.int32)
    t, j = jax.ShapeDtypeStruct((16, 1), jnp.int32), jax.ShapeDtypeStruct((1, 16), jnp.int32)
    for name, fn, example in (("score_mod", score_mod, (jax.ShapeDtypeStruct((16, 16), F32),)),
                              ("mask_mod", mask_mod, ())):
        if fn is None:
            continue
        _, consts = jax.closure_convert(fn, *example, i32, i32, t, j)
        if not consts:  # closure_convert hoists traced values only; concrete arrays stay jaxpr constants
            consts = [c for c in jax.make_jaxpr(fn)(*example, i32, i32, t, j).consts if np.ndim(c) > 0]
        if consts:
            raise NotImplementedError(f"{owner}: {name} closes over arrays ({len(consts)}), which the kernel body "
                                      "cannot capture (nor differentiate); use 'chunked' (or make them Python "
                                      "constants)")


def _tile(cfg_block: int, length: int) -> int:
    # Shrink the tile for short sequences (never below 16, Triton's dot minimum) so that tiny inputs do not pad to
    # a full 128-row tile.
    return max(16, min(cfg_block, bl.next_pow2(length)))


def _pad_to(x, axis, size, value=0):
    if x.shape[axis] == size:
        return x
    pad = [(0, 0)] * x.ndim
    pad[axis] = (0, size - x.shape[axis])
    return jnp.pad(x, pad, constant_values=value)


def _batch_spec_index(varies: bool, b):
    return b if varies else 0


# ---- pallas_call wrappers ----------------------------------------------------------------------------------------
def _call(meta: kern.Meta, kernel, grid, arrays: dict, specs: dict, out_shape, out_specs):
    names = tuple(arrays)
    return pl.pallas_call(
        functools.partial(kernel, meta, names), grid=grid,
        in_specs=[specs[n] for n in names], out_specs=out_specs, out_shape=out_shape,
        compiler_params=plgpu.CompilerParams(num_warps=meta.num_warps, num_stages=meta.num_stages),
        interpret=meta.interpret, name=kernel.__name__)(*arrays.values())


def _query_row(meta: kern.Meta):
    """Index map of grid (b, n, i) onto the [B, K, G·Tp] layout: query head n = k·G + g owns rows g·Tp ..."""
    G, nq = meta.G, meta.nq
    return lambda b, n, i: (b, lax.div(n, G), lax.rem(n, G) * nq + i)


def _out_and_lse_specs(meta: kern.Meta):
    """BlockSpecs of a query-tile program's [bq, Vp] output tile and [bq] row statistic (forward, tangent)."""
    row = _query_row(meta)
    return (pl.BlockSpec((None, None, meta.bq, meta.Vp), lambda b, n, i: row(b, n, i) + (0,)),
            pl.BlockSpec((None, None, meta.bq), row))


def _lse_for_probabilities(lse):
    """Rows without any allowed key have lse = -inf and P = 0; +inf makes exp(s - lse) exactly 0 there."""
    return jnp.where(lse == -jnp.inf, jnp.inf, lse)


def _common_specs(meta: kern.Meta, ops: dict, per_query_tile: bool) -> dict:
    """BlockSpecs of the inputs shared by the kernels. per_query_tile: grid (B, N, nq) (forward, dQ, tangent);
    otherwise grid (B, K, nk) (dK/dV)."""
    G, bq, bk, Tp, Sp = meta.G, meta.bq, meta.bk, meta.Tp, meta.Sp
    B = meta.B
    full1 = pl.BlockSpec((B,), lambda *_: (0,))
    specs = dict(qlen=full1, kvlen=full1)
    if "sinks" in ops:
        specs["sinks"] = pl.BlockSpec((meta.N,), lambda *_: (0,))
    sb = meta.seg_batched
    if per_query_tile:
        row = _query_row(meta)
        specs.update(
            q=pl.BlockSpec((None, None, bq, meta.Hp), lambda b, n, i: row(b, n, i) + (0,)),
            k=pl.BlockSpec((None, None, Sp, meta.Hp), lambda b, n, i: (b, lax.div(n, G), 0, 0)),
            v=pl.BlockSpec((None, None, Sp, meta.Vp), lambda b, n, i: (b, lax.div(n, G), 0, 0)),
            do=pl.BlockSpec((None, None, bq, meta.Vp), lambda b, n, i: row(b, n, i) + (0,)),
            lse=pl.BlockSpec((None, None, bq), row), delta=pl.BlockSpec((None, None, bq), row),
            qseg=pl.BlockSpec((None, bq), lambda b, n, i: (_batch_spec_index(sb, b), i)),
            kseg=pl.BlockSpec((None, Sp), lambda b, n, i: (_batch_spec_index(sb, b), 0)),
        )
        for name, dims in (("bias", meta.bias_dims), ("dense", meta.dense_dims)):
            if dims is not None:
                specs[name] = pl.BlockSpec((None, None, bq, Sp), lambda b, n, i, d=dims: (
                    _batch_spec_index(d[0], b), _batch_spec_index(d[1], n), i, 0))
        specs["ids"] = pl.BlockSpec((None, None, None, ops["ids"].shape[-1]), lambda b, n, i: (b, n, i, 0))
    else:
        specs.update(
            q=pl.BlockSpec((None, None, G * Tp, meta.Hp), lambda b, k, j: (b, k, 0, 0)),
            k=pl.BlockSpec((None, None, bk, meta.Hp), lambda b, k, j: (b, k, j, 0)),
            v=pl.BlockSpec((None, None, bk, meta.Vp), lambda b, k, j: (b, k, j, 0)),
            do=pl.BlockSpec((None, None, G * Tp, meta.Vp), lambda b, k, j: (b, k, 0, 0)),
            lse=pl.BlockSpec((None, None, G * Tp), lambda b, k, j: (b, k, 0)),
            delta=pl.BlockSpec((None, None, G * Tp), lambda b, k, j: (b, k, 0)),
            qseg=pl.BlockSpec((None, Tp), lambda b, k, j: (_batch_spec_index(sb, b), 0)),
            kseg=pl.BlockSpec((None, bk), lambda b, k, j: (_batch_spec_index(sb, b), j)),
        )
        for name, dims in (("bias", meta.bias_dims), ("dense", meta.dense_dims)):
            if dims is not None:
                nh = meta.N if dims[1] else 1
                specs[name] = pl.BlockSpec((None, nh, Tp, bk), lambda b, k, j, d=dims: (
                    _batch_spec_index(d[0], b), 0, 0, j))
        specs["ids"] = pl.BlockSpec((None, None, None, ops["ids"].shape[-1]), lambda b, k, j: (b, k, j, 0))
    return specs


def _forward(meta: kern.Meta, ops: dict):
    B, K, G = meta.B, meta.K, meta.G
    arrays = {n: ops[n] for n in ("ids", "qlen", "kvlen", "q", "k", "v", "qseg", "kseg", "bias", "dense", "sinks")
              if ops.get(n) is not None}
    arrays["ids"] = ops["ids"]
    specs = _common_specs(meta, arrays, per_query_tile=True)
    out_shape = (jax.ShapeDtypeStruct((B, K, G * meta.Tp, meta.Vp), ops["q"].dtype),
                 jax.ShapeDtypeStruct((B, K, G * meta.Tp), F32))
    return _call(meta, kern.forward_kernel, (B, meta.N, meta.nq), arrays, specs, out_shape,
                 _out_and_lse_specs(meta))


def _backward(meta: kern.Meta, ops: dict, out, lse, do, dlse):
    B, K, G, N = meta.B, meta.K, meta.G, meta.N
    do = do.astype(ops["q"].dtype)
    # D = rowsum(dO * O) (Alg. 2 line 4); the lse cotangent enters as -dlse since d lse / d s = P.
    delta = jnp.sum(do.astype(F32) * out.astype(F32), axis=-1) - dlse
    lse_b = _lse_for_probabilities(lse)
    base = {n: ops[n] for n in ("qlen", "kvlen", "q", "k", "v", "qseg", "kseg", "bias", "dense")
            if ops.get(n) is not None}
    base.update(do=do, lse=lse_b, delta=delta)

    arrays = dict(ids=ops["ids"], **base)
    specs = _common_specs(meta, arrays, per_query_tile=True)
    row = _query_row(meta)
    out_shape = [jax.ShapeDtypeStruct((B, K, G * meta.Tp, meta.Hp), F32)]
    out_specs = [pl.BlockSpec((None, None, meta.bq, meta.Hp), lambda b, n, i: row(b, n, i) + (0,))]
    if meta.bias_dims is not None and meta.bias_grad:
        out_shape.append(jax.ShapeDtypeStruct((B, N, meta.Tp, meta.Sp), F32))
        out_specs.append(pl.BlockSpec((None, None, meta.bq, meta.Sp), lambda b, n, i: (b, n, i, 0)))
    res = _call(meta, kern.dq_kernel, (B, N, meta.nq), arrays, specs, tuple(out_shape), tuple(out_specs))
    dq = res[0]

    arrays = dict(ids=ops["ids_t"], **base)
    specs = _common_specs(meta, arrays, per_query_tile=False)
    out_shape = (jax.ShapeDtypeStruct((B, K, meta.Sp, meta.Hp), F32),
                 jax.ShapeDtypeStruct((B, K, meta.Sp, meta.Vp), F32))
    out_specs = (pl.BlockSpec((None, None, meta.bk, meta.Hp), lambda b, k, j: (b, k, j, 0)),
                 pl.BlockSpec((None, None, meta.bk, meta.Vp), lambda b, k, j: (b, k, j, 0)))
    dk, dv = _call(meta, kern.dkv_kernel, (B, K, meta.nk), arrays, specs, out_shape, out_specs)

    grads = dict(q=dq.astype(ops["q"].dtype), k=dk.astype(ops["k"].dtype), v=dv.astype(ops["v"].dtype))
    if meta.bias_dims is not None and meta.bias_grad:
        dbias = res[1]
        axes = tuple(ax for ax, varies in zip((0, 1), meta.bias_dims) if not varies)
        grads["bias"] = jnp.sum(dbias, axis=axes, keepdims=True).astype(ops["bias"].dtype)
    if meta.has_sinks:
        sinks = ops["sinks"].reshape(1, K, G, 1)
        lse4 = lse.reshape(B, K, G, meta.Tp)
        p_sink = jnp.where(lse4 == -jnp.inf, 0.0, jnp.exp(sinks - lse4))
        grads["sinks"] = -jnp.sum(p_sink * delta.reshape(B, K, G, meta.Tp), axis=(0, 3)).reshape(N)
    return grads


def _tangent(meta: kern.Meta, ops: dict, out, lse, tangents: dict):
    """Forward-mode tangents (dO, dL) of (out, lse) in the kernel layout, given the tangents of q, k, v, bias, sinks
    in that layout, for the perturbed inputs only (absent ones are zero)."""
    arrays = {n: ops[n] for n in ("ids", "qlen", "kvlen", "q", "k", "v", "qseg", "kseg", "bias", "dense", "sinks")
              if ops.get(n) is not None}
    arrays.update(out=out, lse=_lse_for_probabilities(lse))
    arrays.update({"t" + n: t.astype(ops[n].dtype) for n, t in tangents.items()})
    specs = _common_specs(meta, arrays, per_query_tile=True)
    specs["out"] = specs["do"]
    for n in tangents:
        specs["t" + n] = specs[n]
    out_shape = (jax.ShapeDtypeStruct(out.shape, out.dtype), jax.ShapeDtypeStruct(lse.shape, F32))
    return _call(meta, kern.tangent_kernel, (meta.B, meta.N, meta.nq), arrays, specs, out_shape,
                 _out_and_lse_specs(meta))


_DIFF = ("q", "k", "v", "bias", "sinks")


def _flash_forward(meta, diff: dict, rest: dict):
    return _forward(meta, {**rest, **diff})


def _flash_tangent(meta, diff, rest, outs, t_diff):
    return _tangent(meta, {**rest, **diff}, *outs, t_diff)


def _flash_backward(meta, diff, rest, outs, cts_and_names):
    cts, names = cts_and_names
    # dS is materialised as the bias gradient only when the bias is differentiated.
    meta = dataclasses.replace(meta, bias_grad="bias" in names)
    grads = _backward(meta, {**rest, **diff}, *outs, *cts)
    return {n: grads[n] for n in names}


# Reverse mode runs the dQ and dK/dV kernels (as the transpose of the tangent kernel); forward mode the tangent kernel.
_flash = forward_mode.differentiable(_flash_forward, _flash_tangent, _flash_backward)


# ---- preparation -------------------------------------------------------------------------------------------------
def _prepare(args: AttentionArgs, cfg: PallasGpu, live_override=None):
    """Padded operands, block lists and the static Meta of one call."""
    q, k, v, mask = args.q, args.k, args.v, args.mask
    B, T, N, H = q.shape
    _, S, K, V = v.shape
    G = N // K
    bq, bk = _tile(cfg.block_q, T), _tile(cfg.block_kv, S)
    if live_override is not None:
        bq, bk = cfg.block_q, cfg.block_kv
    Hp, Vp = max(16, bl.next_pow2(H)), max(16, bl.next_pow2(V))
    nq, nk = -(-T // bq), -(-S // bk)
    Tp, Sp = nq * bq, nk * bk

    qg = jnp.moveaxis(q.reshape(B, T, K, G, H), 1, 3)  # [B, K, G, T, H]
    qg = _pad_to(_pad_to(qg, 3, Tp), 4, Hp).reshape(B, K, G * Tp, Hp)
    kk = _pad_to(_pad_to(jnp.moveaxis(k, 1, 2), 2, Sp), 3, Hp)
    vv = _pad_to(_pad_to(jnp.moveaxis(v, 1, 2), 2, Sp), 3, Vp)

    def lengths(x, n):
        if x is None:
            return jnp.full((B,), n, jnp.int32)
        return jnp.minimum(jnp.broadcast_to(jnp.asarray(x, jnp.int32), (B,)), n)

    ops = dict(q=qg, k=kk, v=vv, qlen=lengths(mask.q_lengths, T), kvlen=lengths(mask.kv_lengths, S))
    seg_batched = False
    if mask.q_segment_ids is not None:
        qs, ks = jnp.asarray(mask.q_segment_ids, jnp.int32), jnp.asarray(mask.kv_segment_ids, jnp.int32)
        seg_batched = qs.shape[0] > 1 or ks.shape[0] > 1
        nb = B if seg_batched else 1
        ops["qseg"] = _pad_to(jnp.broadcast_to(qs, (nb, T)), 1, Tp)
        ops["kseg"] = _pad_to(jnp.broadcast_to(ks, (nb, S)), 1, Sp)

    bias_dims = None
    if args.bias is not None:
        bias = args.bias
        bias_dims = (bias.shape[0] > 1, bias.shape[1] > 1)
        bias = jnp.broadcast_to(bias, bias.shape[:2] + (T, S))
        ops["bias"] = _pad_to(_pad_to(bias, 2, Tp), 3, Sp)

    dense = None
    if mask.dense is not None:
        dense = jnp.broadcast_to(jnp.asarray(mask.dense, bool), mask.dense.shape[:2] + (T, S))
    if mask.block_mask is not None and not bl.block_mask_is_aligned(mask, bq, bk):
        # A block mask finer than the tile is applied element-wise (materialised once, O(T·S) per head).
        bm = Mask(block_mask=mask.block_mask, block_size=mask.block_size).materialize(T, S)
        dense = bm if dense is None else (dense & bm)
    dense_dims = None
    if dense is not None:
        dense_dims = (dense.shape[0] > 1, dense.shape[1] > 1)
        ops["dense"] = _pad_to(_pad_to(dense.astype(jnp.int8), 2, Tp), 3, Sp)
    if args.sinks is not None:
        ops["sinks"] = args.sinks.astype(F32)

    live = bl.live_blocks(mask, T, S, bq, bk, dense) if live_override is None else live_override
    full = bl.full_blocks(mask, T, S, bq, bk, dense)
    if args.mask_mod is not None:
        # mask_mod takes part in skipping like every other mask component (it closes over no arrays: `check`).
        mod_live, mod_full = bl.mask_mod_tables(args.mask_mod, B, N, T, S, bq, bk)
        live, full = live & mod_live, full & mod_full
    live = jnp.broadcast_to(live, (B, N, nq, nk))
    full = jnp.broadcast_to(full, live.shape)
    ops["ids"] = bl.lists(live, full)

    # Transposed lists for dK/dV: per (b, k, key tile) the live (g, i) pairs, flattened as e = g * nq + i.
    def transpose(x):
        return jnp.moveaxis(x.reshape(B, K, G, nq, nk), 4, 2).reshape(B, K, nk, G * nq)

    ops["ids_t"] = bl.lists(transpose(live), transpose(full))

    meta = kern.Meta(
        B=B, T=T, S=S, N=N, K=K, H=H, V=V, Hp=Hp, Vp=Vp, bq=bq, bk=bk, scale=float(args.scale),
        cap=None if args.logits_soft_cap is None else float(args.logits_soft_cap),
        left=mask.effective_window[0], right=mask.effective_window[1], q_offset=mask.q_offset,
        has_seg="qseg" in ops, seg_batched=seg_batched, bias_dims=bias_dims, dense_dims=dense_dims,
        has_sinks=args.sinks is not None, score_mod=args.score_mod, mask_mod=args.mask_mod,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, interpret=resolve_interpret(cfg.interpret))
    return meta, ops


def _run_prepared(meta: kern.Meta, ops: dict, out_dtype, return_lse: bool):
    diff = {n: ops[n] for n in _DIFF if n in ops}
    rest = {n: v for n, v in ops.items() if n not in diff}
    out, lse = _flash(meta, diff, rest)
    B, K, G, T = meta.B, meta.K, meta.G, meta.T
    out = out.reshape(B, K, G, meta.Tp, meta.Vp)[:, :, :, :T, :meta.V]
    out = jnp.moveaxis(out, 3, 1).reshape(B, T, meta.N, meta.V).astype(out_dtype)
    if not return_lse:
        return out
    lse = jnp.moveaxis(lse.reshape(B, K, G, meta.Tp)[:, :, :, :T], 3, 1).reshape(B, T, meta.N)
    return out, lse


def run(args: AttentionArgs, cfg: PallasGpu | None = None, return_lse: bool = False):
    """out [B, T, N, V] (and lse [B, T, N] float32) from canonical arguments."""
    cfg = cfg or PallasGpu()
    check(args, return_lse, cfg)
    meta, ops = _prepare(args, cfg)
    return _run_prepared(meta, ops, args.q.dtype, return_lse)


def block_sparse_attention(query, key, value, block_ids, block_counts, *, block_size, scale=None,
                           causal: bool = False, interpret: bool | None = None, num_warps: int = 4,
                           num_stages: int = 2):
    """Softmax attention over an explicit block list (SeerAttention-style block sparsity, arXiv 2410.13276).

    query [B, T, N, H], key [B, S, K, H], value [B, S, K, V]; block_ids int [B|1, N|1, nq, L] and block_counts int
    [B|1, N|1, nq] with nq = ceil(T / block_q): query tile i attends to key tiles block_ids[..., i, :count] (at
    block_size = block_q or (block_q, block_kv), powers of two >= 16); `causal` additionally masks the diagonal.
    Every other tile is neither loaded nor computed. Differentiable (reverse mode) in query, key and value.
    """
    from attnx.validation import canonicalize

    bs = (block_size, block_size) if isinstance(block_size, (int, np.integer)) else tuple(block_size)
    if len(bs) != 2 or any(isinstance(x, bool) or not isinstance(x, (int, np.integer)) or x < 16 or x & (x - 1)
                           for x in bs):
        raise ValueError(f"block_size: expected a power of two >= 16 or a pair (block_q, block_kv) of them (the "
                         f"kernel's tiles), got {block_size!r}")
    cfg = PallasGpu(block_q=int(bs[0]), block_kv=int(bs[1]), num_warps=num_warps, num_stages=num_stages,
                    interpret=interpret)
    args = canonicalize(query, key, value, None, Mask(causal=causal), scale=scale)
    B, T, N, _ = args.q.shape
    S = args.k.shape[1]
    nq, nk = -(-T // cfg.block_q), -(-S // cfg.block_kv)
    ids = jnp.asarray(block_ids, jnp.int32)
    counts = jnp.asarray(block_counts, jnp.int32)
    if ids.ndim != 4 or ids.shape[2] != nq or counts.shape != ids.shape[:3] or ids.shape[0] not in (1, B) \
            or ids.shape[1] not in (1, N):
        raise ValueError(f"block_ids/block_counts: expected [B|1, N|1, {nq}, L] and [B|1, N|1, {nq}] for T={T} at "
                         f"block_q={cfg.block_q}, got {list(ids.shape)} and {list(counts.shape)}")
    check(args, False, cfg)
    # The explicit list becomes a tile table (the backward needs its transpose); ids past the count are ignored.
    valid = jnp.arange(ids.shape[-1]) < counts[..., None]
    live = jnp.any((ids[..., None] == jnp.arange(nk)) & valid[..., None], axis=-2)  # [B|1, N|1, nq, nk]
    band = jnp.asarray(bl.static_band(args.mask, T, S, cfg.block_q, cfg.block_kv, nq, nk))
    meta, ops = _prepare(args, cfg, live_override=live & band)
    out = _run_prepared(meta, ops, args.q.dtype, False)
    return out.reshape(args.batch_shape + out.shape[1:])
