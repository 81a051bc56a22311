"""Pallas GPU (Triton lowering) kernel for multi-stream cross-attention: several softmaxes sharing one query tile.

    out = sum_s w_s * softmax(scale * q k_s^T) v_s

IP-Adapter's decoupled cross-attention (Ye et al. 2023, arXiv 2308.06721, §3.2.2) and its many-stream relatives
(MIP-Adapter, DPDEdit, PortraitTalk; see attnx/ops/cross/multi_stream.py, whose `multi_stream_reference` is the
oracle). Running one flash-attention call per stream reads the query tile once per stream and writes one output per
stream; this kernel reads it once, keeps one online-softmax state (m_s, l_s, acc_s) per stream
(FlashAttention-2: Dao 2023, arXiv 2307.08691, Alg. 1, lines 5-12, with the kv loop inside one program per query
block as in §3.2), and writes sum_s w_s * acc_s / l_s once.

Grid and layout. Arrays stay in the attnx layout [B, T, N, H] (no transposes). The forward and the dQ kernel run on a
(B*N, T/block_q) grid; stream s with K_s kv heads is read at head n // (N / K_s) (GQA per stream, never repeated).
The streams are a static Python loop: their number, lengths S_s and head counts are static. Each stream gets its own
key block (the configured block_kv capped at its padded length, so a 4-token image stream costs one 16-key block).

Padding (done in the wrapper, so the kernels see only whole blocks): T to block_q, every S_s to its block, H and V to
a power of two >= 16 (Triton's dot needs power-of-two tiles of at least 16). Padded keys are masked with a large
negative logit; padded query rows are computed and sliced off; padded head-dim columns are zeros and change no dot
product.

Weights: a Python number is baked into the kernel (a literal 0 drops its stream, as the JAX version does); an array
weight (scalar array, [*B, T] or [*B, T, N]) is read per query tile and is differentiable.

Backward (reverse mode of `attnx.ops.forward_mode.differentiable`), per stream the FlashAttention-2 backward (Alg. 2) with dO_s = w_s * dO:
- the forward also writes every stream's normalised output O_s and its log-sum-exp (base 2);
- a dQ kernel on the forward's grid computes D_s = rowsum(dO * O_s) (which is dL/dw_s per position and head, and
  gives FA2's delta_s = w_s * D_s), then sums every stream's dS_s K_s into one dQ accumulator;
- one dK/dV kernel per stream on a (B*K_s, S_s/block_kv) grid loops over the G_s query heads of its kv head and the
  query blocks (the GQA sum inside the kernel, no [N]-sized dK buffer).
Only the differentiated streams run their dK/dV kernel. Forward mode (`jax.jvp`): dO = sum_s (w_s dO_s + dw_s O_s),
each dO_s from the softmax kernel's tangent kernel (`attnx.ops.softmax.pallas_gpu`) on that stream.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import numbers
import os
from typing import ClassVar

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from attnx.ops import forward_mode

# Finite, so that max/exp arithmetic on fully padded columns never produces inf - inf = NaN.
_MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)
_LOG2E = math.log2(math.e)
_NT = (((1,), (1,)), ((), ()))  # a @ b^T
_TN = (((0,), (0,)), ((), ()))  # a^T @ b


def _pow2_at_least_16(owner: str, name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 16 or value & (value - 1):
        raise ValueError(f"{owner}.{name}: expected a power of two >= 16 (Triton dot tiles), got {value!r}")


@dataclasses.dataclass(frozen=True)
class MultiStreamPallas:
    """Configuration of the fused multi-stream kernel; pass it as `implementation=` to
    `multi_stream_cross_attention` (the name "pallas_gpu" uses the defaults).

    block_q, block_kv: query and key tile sizes (powers of two >= 16); a stream shorter than block_kv uses the
    smallest power of two >= 16 that holds it. num_warps: None picks 4 for head dims <= 64, else 8. interpret: run
    the kernels in the Pallas interpreter (any backend, slowly); None reads ATTNX_PALLAS_INTERPRET=1.
    """

    name: ClassVar[str] = "pallas_gpu"
    block_q: int = 64
    block_kv: int = 64
    num_warps: int | None = None
    num_stages: int = 2
    interpret: bool | None = None

    def __post_init__(self):
        _pow2_at_least_16("MultiStreamPallas", "block_q", self.block_q)
        _pow2_at_least_16("MultiStreamPallas", "block_kv", self.block_kv)
        if self.num_warps is not None and self.num_warps not in (1, 2, 4, 8, 16):
            raise ValueError(f"MultiStreamPallas.num_warps: expected None or one of 1, 2, 4, 8, 16, got "
                             f"{self.num_warps!r}")
        if isinstance(self.num_stages, bool) or not isinstance(self.num_stages, int) or self.num_stages < 1:
            raise ValueError(f"MultiStreamPallas.num_stages: expected a positive int, got {self.num_stages!r}")
        if self.interpret is not None and not isinstance(self.interpret, bool):
            raise ValueError(f"MultiStreamPallas.interpret: expected None, True or False, got {self.interpret!r}")

    def resolved_interpret(self) -> bool:
        if self.interpret is not None:
            return self.interpret
        return os.environ.get("ATTNX_PALLAS_INTERPRET", "0").lower() in ("1", "true", "yes")


@dataclasses.dataclass(frozen=True)
class _Stream:
    length: int  # S_s before padding
    heads: int  # K_s
    block_kv: int
    weight: float | None  # the static weight, None when it is an array input
    weight_kind: str  # "static" | "row" ([B, T]) | "head" ([B, T, N])

    @property
    def padded(self) -> int:
        return -(-self.length // self.block_kv) * self.block_kv


@dataclasses.dataclass(frozen=True)
class _Plan:
    """Everything static about one call: hashable, the custom_jvp's non-differentiable argument."""

    N: int
    Tp: int
    Hp: int
    Vp: int
    block_q: int
    scale: float
    streams: tuple[_Stream, ...]
    num_warps: int
    num_stages: int
    interpret: bool

    def call(self, kernel, *, grid, in_specs, out_specs, out_shape, name):
        return pl.pallas_call(
            kernel, grid=grid, in_specs=in_specs, out_specs=out_specs, out_shape=out_shape,
            compiler_params=plgpu.CompilerParams(num_warps=self.num_warps, num_stages=self.num_stages),
            interpret=self.interpret, name=name)


def _dot(a, b, dims=(((1,), (0,)), ((), ()))):
    # float32 operands at full IEEE precision: the GPU's default for float32 dots is TF32, measured 1.6e-3 off the
    # reference on an H200 (80x the float32 tolerance)
    precision = lax.Precision.HIGHEST if a.dtype == jnp.float32 and b.dtype == jnp.float32 else None
    return lax.dot_general(a, b, dims, precision=precision, preferred_element_type=jnp.float32)


def _divmod(i, n: int):
    """Quotient and remainder of a non-negative traced index: truncating lax.div/rem, because jnp's floor-division
    fix-up lowers to a boolean remainder that the Triton lowering rejects (caught by the cuda lowering test)."""
    return lax.div(i, n), lax.rem(i, n)


def _key_valid(start, block: int, length: int):
    """[1, block] bool: which keys of the block at `start` are real (iota compare; Triton has no gathers)."""
    return (start + lax.broadcasted_iota(jnp.int32, (1, block), 1)) < length


def _weight_tile(stream: _Stream, w_ref):
    """The stream's weight for the rows of a query tile as [rows, 1] float32 (or the static Python float)."""
    return stream.weight if w_ref is None else w_ref[...].astype(jnp.float32)[:, None]


# ---- Forward ----

def _forward_kernel(q_ref, *refs, plan: _Plan, residuals: bool):
    n_in = sum(2 + (s.weight is None) for s in plan.streams)
    ins, (out_ref, *res_refs) = refs[:n_in], refs[n_in:]
    ins, res_refs = iter(ins), iter(res_refs)
    q = q_ref[...]  # [block_q, Hp], loaded once for every stream
    bq = q.shape[0]
    total = jnp.zeros((bq, plan.Vp), jnp.float32)
    for stream in plan.streams:
        k_ref, v_ref = next(ins), next(ins)
        w_ref = next(ins) if stream.weight is None else None
        bk = stream.block_kv

        def body(j, carry, k_ref=k_ref, v_ref=v_ref, stream=stream, bk=bk):
            m_prev, l_prev, acc = carry
            start = pl.multiple_of(j * bk, bk)
            k = k_ref[pl.ds(start, bk), :]
            v = v_ref[pl.ds(start, bk), :]
            s = _dot(q, k, _NT) * (plan.scale * _LOG2E)  # base-2 logits: exp2 is the cheap exponential
            if stream.length % bk:
                s = jnp.where(_key_valid(start, bk, stream.length), s, _MASK_VALUE)
            m_next = jnp.maximum(m_prev, jnp.max(s, axis=1))
            correction = jnp.exp2(m_prev - m_next)
            p = jnp.exp2(s - m_next[:, None])
            l_next = correction * l_prev + jnp.sum(p, axis=1)
            acc = correction[:, None] * acc + _dot(p.astype(v.dtype), v)
            return m_next, l_next, acc

        init = (jnp.full((bq,), -jnp.inf, jnp.float32), jnp.zeros((bq,), jnp.float32),
                jnp.zeros((bq, plan.Vp), jnp.float32))
        m, l, acc = lax.fori_loop(0, stream.padded // bk, body, init)
        o = acc / l[:, None]  # the stream's normalised output O_s (FA2 Alg. 1 line 12)
        total = total + _weight_tile(stream, w_ref) * o
        if residuals:
            o_ref, lse_ref = next(res_refs), next(res_refs)
            o_ref[...] = o.astype(o_ref.dtype)
            lse_ref[...] = m + jnp.log2(l)
    out_ref[...] = total.astype(out_ref.dtype)


def _row_specs(plan: _Plan, width: int):
    """Block of a [B, Tp, N, width] array at grid point (b*N + n, t)."""
    def index(bn, t):
        b, n = _divmod(bn, plan.N)
        return b, t, n, 0
    return pl.BlockSpec((None, plan.block_q, None, width), index)


def _lse_spec(plan: _Plan):
    def index(bn, t):
        b, n = _divmod(bn, plan.N)
        return b, n, t
    return pl.BlockSpec((None, None, plan.block_q), index)


def _stream_in_specs(plan: _Plan, stream: _Stream, width_k: int, width_v: int):
    """Whole-stream key/value blocks at kv head n // G_s, plus the weight tile when the weight is an array."""
    G, Sp = plan.N // stream.heads, stream.padded

    def kv_index(bn, t):
        b, n = _divmod(bn, plan.N)
        return b, 0, lax.div(n, G), 0

    def weight_index(bn, t):
        b, n = _divmod(bn, plan.N)
        return (b, t) if stream.weight_kind == "row" else (b, t, n)

    specs = [pl.BlockSpec((None, Sp, None, width), kv_index) for width in (width_k, width_v)]
    if stream.weight_kind == "row":
        specs.append(pl.BlockSpec((None, plan.block_q), weight_index))
    elif stream.weight_kind == "head":
        specs.append(pl.BlockSpec((None, plan.block_q, None), weight_index))
    return specs


def _stream_inputs(plan: _Plan, ks, vs, ws):
    args = []
    for stream, k, v, w in zip(plan.streams, ks, vs, ws):
        args += [k, v] + ([w] if stream.weight is None else [])
    return args


def _forward(plan: _Plan, q, ks, vs, ws, residuals: bool):
    B = q.shape[0]
    grid = (B * plan.N, plan.Tp // plan.block_q)
    in_specs = [_row_specs(plan, plan.Hp)]
    for stream in plan.streams:
        in_specs += _stream_in_specs(plan, stream, plan.Hp, plan.Vp)
    out_shape = [jax.ShapeDtypeStruct((B, plan.Tp, plan.N, plan.Vp), q.dtype)]
    out_specs = [_row_specs(plan, plan.Vp)]
    if residuals:
        for _ in plan.streams:
            out_shape += [jax.ShapeDtypeStruct((B, plan.Tp, plan.N, plan.Vp), q.dtype),
                          jax.ShapeDtypeStruct((B, plan.N, plan.Tp), jnp.float32)]
            out_specs += [_row_specs(plan, plan.Vp), _lse_spec(plan)]
    outs = plan.call(functools.partial(_forward_kernel, plan=plan, residuals=residuals), grid=grid,
                     in_specs=in_specs, out_specs=out_specs, out_shape=out_shape, name="multi_stream_forward")(
        q, *_stream_inputs(plan, ks, vs, ws))
    return outs[0], tuple(outs[1::2]), tuple(outs[2::2])


# ---- Backward: dQ (and D_s = rowsum(dO * O_s)) ----

def _dq_kernel(q_ref, do_ref, *refs, plan: _Plan):
    n_in = sum(4 + (s.weight is None) for s in plan.streams)
    ins, (dq_ref, *d_refs) = iter(refs[:n_in]), refs[n_in:]
    q = q_ref[...]
    do = do_ref[...].astype(jnp.float32)
    dq = jnp.zeros(q.shape, jnp.float32)
    for stream, d_ref in zip(plan.streams, d_refs):
        k_ref, v_ref = next(ins), next(ins)
        w_ref = next(ins) if stream.weight is None else None
        o_ref, lse_ref = next(ins), next(ins)
        d = jnp.sum(do * o_ref[...].astype(jnp.float32), axis=1)  # dL/dw_s for these rows and this head
        d_ref[...] = d
        w = _weight_tile(stream, w_ref)
        do_s = (w * do).astype(q.dtype)  # dO_s = w_s dO, rounded like every operand fed to the MMA
        delta = w * d[:, None]  # FA2's D_i = rowsum(dO_s * O_s)
        lse = lse_ref[...][:, None]
        bk = stream.block_kv

        def body(j, dq, k_ref=k_ref, v_ref=v_ref, stream=stream, bk=bk, do_s=do_s, delta=delta, lse=lse):
            start = pl.multiple_of(j * bk, bk)
            k = k_ref[pl.ds(start, bk), :]
            v = v_ref[pl.ds(start, bk), :]
            s = _dot(q, k, _NT) * (plan.scale * _LOG2E)
            if stream.length % bk:
                s = jnp.where(_key_valid(start, bk, stream.length), s, _MASK_VALUE)
            p = jnp.exp2(s - lse)
            ds = p * (_dot(do_s, v, _NT) - delta)
            return dq + _dot(ds.astype(k.dtype), k)

        dq = lax.fori_loop(0, stream.padded // bk, body, dq)
    dq_ref[...] = (dq * plan.scale).astype(dq_ref.dtype)


def _dq(plan: _Plan, q, do, ks, vs, ws, os_, lses):
    B = q.shape[0]
    in_specs = [_row_specs(plan, plan.Hp), _row_specs(plan, plan.Vp)]
    args = [q, do]
    for stream, k, v, w, o, lse in zip(plan.streams, ks, vs, ws, os_, lses):
        in_specs += _stream_in_specs(plan, stream, plan.Hp, plan.Vp) + [_row_specs(plan, plan.Vp), _lse_spec(plan)]
        args += [k, v] + ([w] if stream.weight is None else []) + [o, lse]
    out_shape = [jax.ShapeDtypeStruct(q.shape, q.dtype)]
    out_shape += [jax.ShapeDtypeStruct((B, plan.N, plan.Tp), jnp.float32) for _ in plan.streams]
    out_specs = [_row_specs(plan, plan.Hp)] + [_lse_spec(plan) for _ in plan.streams]
    outs = plan.call(functools.partial(_dq_kernel, plan=plan), grid=(B * plan.N, plan.Tp // plan.block_q),
                     in_specs=in_specs, out_specs=out_specs, out_shape=out_shape, name="multi_stream_dq")(*args)
    return outs[0], tuple(outs[1:])


# ---- Backward: dK, dV of one stream ----

def _dkdv_kernel(q_ref, do_ref, lse_ref, d_ref, k_ref, v_ref, *refs, plan: _Plan, stream: _Stream):
    w_ref, (dk_ref, dv_ref) = (refs[0] if stream.weight is None else None), refs[-2:]
    k = k_ref[...]
    v = v_ref[...]
    bq, G, n_t = plan.block_q, plan.N // stream.heads, plan.Tp // plan.block_q

    def body(i, carry):
        dk, dv = carry
        g, t = _divmod(i, n_t)  # query head g of this kv head's group, query block t
        start = pl.multiple_of(t * bq, bq)
        rows = pl.ds(start, bq)
        q = q_ref[rows, g, :]
        do = do_ref[rows, g, :].astype(jnp.float32)
        lse = lse_ref[g, rows][:, None]
        d = d_ref[g, rows][:, None]
        if w_ref is None:
            w = stream.weight
        elif stream.weight_kind == "row":
            w = w_ref[rows].astype(jnp.float32)[:, None]
        else:
            w = w_ref[rows, g].astype(jnp.float32)[:, None]
        do_s = (w * do).astype(q.dtype)
        # Padded query rows have dO = 0 (the output slice's transpose) and weight 0 or dO = 0, so they add nothing;
        # padded key rows produce dK/dV rows that the wrapper slices off, so no key mask is needed here.
        p = jnp.exp2(_dot(q, k, _NT) * (plan.scale * _LOG2E) - lse)
        dv = dv + _dot(p.astype(do_s.dtype), do_s, _TN)
        ds = p * (_dot(do_s, v, _NT) - w * d)
        dk = dk + _dot(ds.astype(q.dtype), q, _TN)
        return dk, dv

    init = (jnp.zeros(k.shape, jnp.float32), jnp.zeros(v.shape, jnp.float32))
    dk, dv = lax.fori_loop(0, G * n_t, body, init)
    dk_ref[...] = (dk * plan.scale).astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


def _dkdv(plan: _Plan, stream: _Stream, q, do, lse, d, k, v, w):
    B, K, G, bk, Tp = q.shape[0], stream.heads, plan.N // stream.heads, stream.block_kv, plan.Tp
    # Grid point (b*K + h, key block j). A block of G along the N axis at block index h holds exactly the query
    # heads n with n // G == h, i.e. the group that reads kv head h.
    def group(bh, j):
        b, h = _divmod(bh, K)
        return b, 0, h, 0

    def per_head(bh, j):
        b, h = _divmod(bh, K)
        return b, h, 0

    def kv_block(bh, j):
        b, h = _divmod(bh, K)
        return b, j, h, 0

    def weight(bh, j):
        b, h = _divmod(bh, K)
        return (b, 0) if stream.weight_kind == "row" else (b, 0, h)

    in_specs = [pl.BlockSpec((None, Tp, G, plan.Hp), group), pl.BlockSpec((None, Tp, G, plan.Vp), group),
                pl.BlockSpec((None, G, Tp), per_head), pl.BlockSpec((None, G, Tp), per_head),
                pl.BlockSpec((None, bk, None, plan.Hp), kv_block), pl.BlockSpec((None, bk, None, plan.Vp), kv_block)]
    args = [q, do, lse, d, k, v]
    if stream.weight_kind == "row":
        in_specs.append(pl.BlockSpec((None, Tp), weight))
        args.append(w)
    elif stream.weight_kind == "head":
        in_specs.append(pl.BlockSpec((None, Tp, G), weight))
        args.append(w)
    return plan.call(functools.partial(_dkdv_kernel, plan=plan, stream=stream), grid=(B * K, stream.padded // bk),
                     in_specs=in_specs, out_specs=in_specs[4:6],
                     out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
                     name="multi_stream_dkdv")(*args)


# ---- forward and reverse mode over padded, flattened arrays ----
# diff: {"q", "k0", "v0", ["w0"], "k1", ...}: stream i's key, value and (array weights only) weight.

def _unpack(plan: _Plan, diff: dict):
    n = len(plan.streams)
    return (diff["q"], tuple(diff[f"k{i}"] for i in range(n)), tuple(diff[f"v{i}"] for i in range(n)),
            tuple(diff.get(f"w{i}") for i in range(n)))


def _fused_forward(plan: _Plan, diff: dict, rest):
    return _forward(plan, *_unpack(plan, diff), residuals=False)[0]


def _fused_forward_with_residuals(plan: _Plan, diff: dict, rest):
    out, os_, lses = _forward(plan, *_unpack(plan, diff), residuals=True)
    return out, (os_, lses)


def _fused_tangent(plan: _Plan, diff: dict, rest, saved, t: dict):
    """Forward mode: out = sum_s w_s O_s, so dO = sum_s (w_s dO_s + dw_s O_s), with dO_s the tangent of stream s's
    softmax attention from the block-skipping softmax kernel's tangent kernel (`attnx.ops.softmax.pallas_gpu`),
    padded keys masked by kv_lengths, and O_s the per-stream outputs this kernel saved."""
    from attnx.api import dot_product_attention
    from attnx.mask import Mask
    from attnx.ops.softmax.config import PallasGpu

    _, (os_, _) = saved
    q = diff["q"]
    total = jnp.zeros((q.shape[0], plan.Tp, plan.N, plan.Vp), jnp.float32)
    for i, stream in enumerate(plan.streams):
        k, v = diff[f"k{i}"], diff[f"v{i}"]
        if any(n in t for n in ("q", f"k{i}", f"v{i}")):
            impl = PallasGpu(block_q=plan.block_q, block_kv=stream.block_kv, num_warps=plan.num_warps,
                             num_stages=plan.num_stages, interpret=plan.interpret)
            mask = Mask(kv_lengths=stream.length) if stream.padded != stream.length else None
            attend = functools.partial(dot_product_attention, mask=mask, scale=plan.scale, implementation=impl)
            tangents = tuple(t[n] if n in t else jnp.zeros_like(x) for n, x in (("q", q), (f"k{i}", k), (f"v{i}", v)))
            d_stream = jax.jvp(attend, (q, k, v), tangents)[1].astype(jnp.float32)
            w = stream.weight if stream.weight_kind == "static" else diff[f"w{i}"]
            total = total + d_stream * _weight_as_rows(stream, w)
        if f"w{i}" in t:
            total = total + os_[i].astype(jnp.float32) * _weight_as_rows(stream, t[f"w{i}"])
    return total.astype(q.dtype)


def _weight_as_rows(stream: _Stream, w):
    """A stream weight broadcast against [B, Tp, N, V]."""
    if stream.weight_kind == "static":
        return w
    return w[:, :, None, None] if stream.weight_kind == "row" else w[..., None]


def _fused_backward(plan: _Plan, diff: dict, rest, saved, cts_and_names):
    do, names = cts_and_names
    _, (os_, lses) = saved
    q, ks, vs, ws = _unpack(plan, diff)
    dq, ds = _dq(plan, q, do, ks, vs, ws, os_, lses)
    grads = {"q": dq}
    for i, (stream, k, v, w, lse, d) in enumerate(zip(plan.streams, ks, vs, ws, lses, ds)):
        if f"k{i}" in names or f"v{i}" in names:
            grads[f"k{i}"], grads[f"v{i}"] = _dkdv(plan, stream, q, do, lse, d, k, v, w)
        if w is not None:
            # d: [B, N, Tp] = dL/dw per position and head; a [B, T] weight is shared by the heads, so their parts add.
            grads[f"w{i}"] = d.sum(axis=1) if stream.weight_kind == "row" else d.transpose(0, 2, 1)
    return {n: grads[n] for n in names}


# jax.grad: the dQ and per-stream dK/dV kernels; jax.jvp: per-stream softmax tangent kernels (attnx.ops.forward_mode).
_fused = forward_mode.differentiable(_fused_forward, _fused_tangent, _fused_backward,
                                     forward_with_residuals=_fused_forward_with_residuals)


# ---- Public entry ----

def _pow2_block(n: int) -> int:
    return max(16, pl.next_power_of_2(n))


def _pad_axis(x, axis: int, size: int):
    if x.shape[axis] == size:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, size - x.shape[axis])
    return jnp.pad(x, widths)


def multi_stream_pallas(query, streams, *, scale: float | None = None,
                        config: MultiStreamPallas | None = None) -> jax.Array:
    """sum_s w_s * softmax(scale * q k_s^T) v_s in one fused Pallas kernel -> [*B, T, N, V] in the query's dtype.

    Same arguments as `multi_stream_cross_attention` (query [*B, T, N, H]; streams of (key [*B, S_s, K_s, H],
    value [*B, S_s, K_s, V], weight) with weight a Python number, a scalar array, [*B, T] or [*B, T, N]); config
    sets tiles and interpret mode. Differentiable in the query, every key/value and every array weight.
    Raises NotImplementedError off GPU unless interpret mode is on (config.interpret or ATTNX_PALLAS_INTERPRET=1).
    """
    from attnx.ops.cross.multi_stream import _check_streams, _is_static_zero  # that module dispatches here

    config = MultiStreamPallas() if config is None else config
    if not isinstance(config, MultiStreamPallas):
        raise ValueError(f"multi_stream_pallas.config: expected a MultiStreamPallas, got {config!r}")
    streams = _check_streams("multi_stream_pallas", query, streams)
    interpret = config.resolved_interpret()
    if not interpret and jax.default_backend() != "gpu":
        raise NotImplementedError(f"multi_stream_pallas: the Triton kernel needs a GPU (backend is "
                                  f"{jax.default_backend()!r}); pass MultiStreamPallas(interpret=True) or set "
                                  "ATTNX_PALLAS_INTERPRET=1 to run it in the Pallas interpreter")
    query = jnp.asarray(query)
    batch_shape, (T, N, H) = query.shape[:-3], query.shape[-3:]
    V = jnp.shape(streams[0][1])[-1]
    out_dtype = query.dtype
    live = [(jnp.asarray(k), jnp.asarray(v), w) for k, v, w in streams
            if not _is_static_zero(w) and jnp.shape(k)[-3] > 0]  # an empty stream's softmax is 0 (fully masked)
    B = math.prod(batch_shape)
    if not live or B == 0 or T == 0:
        return jnp.zeros((*batch_shape, T, N, V), out_dtype)
    dtype = jnp.result_type(query, *[x for k, v, _ in live for x in (k, v)])
    scale = H ** -0.5 if scale is None else float(scale)

    block_q = min(config.block_q, _pow2_block(T))
    Tp, Hp, Vp = -(-T // block_q) * block_q, _pow2_block(H), _pow2_block(V)
    q = _pad_axis(_pad_axis(query.astype(dtype).reshape(B, T, N, H), 1, Tp), 3, Hp)
    plans, ks, vs, ws = [], [], [], []
    for k, v, w in live:
        S, K = k.shape[-3], k.shape[-2]
        if isinstance(w, numbers.Number):
            stream = _Stream(S, K, min(config.block_kv, _pow2_block(S)), float(w), "static")
            ws.append(None)
        else:
            w = jnp.asarray(w, jnp.float32)
            kind = "head" if w.ndim == len(batch_shape) + 2 else "row"
            w = jnp.broadcast_to(w, (*batch_shape, T)) if w.ndim == 0 else w
            w = w.reshape(B, T, N) if kind == "head" else w.reshape(B, T)
            stream = _Stream(S, K, min(config.block_kv, _pow2_block(S)), None, kind)
            ws.append(_pad_axis(w, 1, Tp))  # padded query rows get weight 0
        plans.append(stream)
        ks.append(_pad_axis(_pad_axis(k.astype(dtype).reshape(B, S, K, H), 1, stream.padded), 3, Hp))
        vs.append(_pad_axis(_pad_axis(v.astype(dtype).reshape(B, S, K, V), 1, stream.padded), 3, Vp))
    num_warps = config.num_warps or (4 if max(Hp, Vp) <= 64 else 8)
    plan = _Plan(N=N, Tp=Tp, Hp=Hp, Vp=Vp, block_q=block_q, scale=scale, streams=tuple(plans),
                 num_warps=num_warps, num_stages=config.num_stages, interpret=interpret)
    diff = {"q": q}
    for i, (k, v, w) in enumerate(zip(ks, vs, ws)):
        diff.update({f"k{i}": k, f"v{i}": v, **({} if w is None else {f"w{i}": w})})
    out = _fused(plan, diff, ())
    return out[:, :T, :, :V].reshape(*batch_shape, T, N, V).astype(out_dtype)
