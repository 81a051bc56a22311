"""Pallas GPU (Triton lowering) kernel of decayed causal linear attention: the Lightning Attention-2 tiling.

    o_t = sum_{j <= t} lambda^(t - j) (q_t . k_j) v_j,    lambda = exp(-s) per query head (s = 0: no decay)

Qin et al., 2024, "Lightning Attention-2: A Free Lunch for Handling Unlimited Sequence Lengths in Large Language
Models", arXiv 2401.04658, Algorithm 1 (forward) and Algorithm 2 (backward); the decayed block form is
`attnx.ops.linear.chunked` (same notation: blocks of C rows, r and c offsets inside a block):

    intra  O_i += [(Q_i K_i^T) ⊙ Λ] V_i,    Λ_rc = lambda^(r - c) for r >= c, else 0
    inter  O_i += lambda^r ⊙ (Q_i KV)
    state  KV  <- lambda^C KV + (lambda^(C - c) ⊙ K_i)^T V_i                         ([H, V], float32)

Grid and layout. Arrays stay in the attnx layout [B, T, N, H]; one program per (batch * query head, value tile of
`block_v` columns) walks the blocks of its sequence in order, carrying its [H, block_v] slice of the state (the
value tiles are independent: every product above is linear in V's columns). GQA reads kv head n // (N / K); nothing
is repeated in memory.

Backward (Algorithm 2; reverse mode of `attnx.ops.forward_mode.differentiable`), on the same grid, with dO the output cotangent:
- dQ, forward loop:   dQ_i = [(dO_i V_i^T) ⊙ Λ] K_i + lambda^r ⊙ (dO_i KV^T), KV updated as in the forward;
- dK, dV, reverse loop carrying dKV = sum over later blocks of decayed Q^T dO:
      dK_i = [(dO_i V_i^T) ⊙ Λ]^T Q_i + lambda^(C - c) ⊙ (V_i dKV^T)
      dV_i = [(Q_i K_i^T) ⊙ Λ]^T dO_i + lambda^(C - c) ⊙ (K_i dKV)
      dKV <- lambda^C dKV + (lambda^r ⊙ Q_i)^T dO_i.
  dQ and dK contract over V, so each value tile writes a float32 partial that the wrapper sums; dK and dV of the G
  query heads sharing a kv head are summed there too (GQA).
- d/ds (the slopes are differentiable): d/ds lambda^(t-j) = -(t - j) lambda^(t-j), so the dQ kernel also writes
      -dO_t . [ sum_{j <= t} (t - j) lambda^(t - j) (q_t . k_j) v_j ]
  per row and value column (summed in the wrapper), computed blockwise like the output: intra
  [(Q_i K_i^T) ⊙ (gap ⊙ Λ)] V_i, inter r lambda^r ⊙ (Q_i KV) + lambda^r ⊙ (Q_i KV'), with a second carried state
  KV' <- lambda^C (C KV + KV') + ((C - c) lambda^(C - c) ⊙ K_i)^T V_i. Every term is local, so it keeps float32
  accuracy at any T. (The closed form sum_j j (k_j . dK_j) - sum_t t (q_t . dQ_t) needs no kernel work but cancels:
  at T=4096 with s=0.5 it lost 1.5e-4 relative, outside the float32 gradient tolerance.) Only perturbed inputs
  take part (symbolic zeros), so when the slopes are constants (the usual case) none of this runs.

Padding in the wrapper: T to a multiple of C, H and V to powers of two >= 16 (Triton dot tiles). Zeros are exact for
linear attention (no normaliser): padded keys and values add nothing, padded rows and columns are sliced off.

Precision: products run on the input dtype with float32 accumulation; the state, decays, masks and score blocks are
float32. Where such a float32 intermediate meets a bf16/f16 operand it enters the MMA as two parts of that dtype
(hi + lo, two products), not rounded once as in the official Triton kernel: the outputs are unnormalised and grow
with T, and rounding P and the state once to bf16 put 7 of 9472 outputs outside the bfloat16 tolerance table at
T=37 (tests/attnx/test_linear_pallas.py, first version). float32 inputs use IEEE float32 dots (not TF32), so the
float32 tolerance holds on GPUs too. Forward mode (`jax.jvp`): the output is linear in
each of q, k, v, so its tangent is the forward kernel run on each perturbed input's tangent (`scan_tangent`).
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import ClassVar

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from attnx.ops import forward_mode

from attnx.validation import canonicalize


def _pow2_at_least_16(owner: str, name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 16 or value & (value - 1):
        raise ValueError(f"{owner}.{name}: expected a power of two >= 16 (Triton dot tiles), got {value!r}")


@dataclasses.dataclass(frozen=True)
class LinearScanPallas:
    """Configuration of the Lightning Attention-2 scan kernel; `lightning_attention(..., implementation=)` and
    `based_attention(..., implementation=)` accept an instance (the name "pallas_gpu" uses the defaults, with the
    caller's block_size).

    block_size: rows per block C (power of two >= 16; capped at the padded length). block_v: value columns per
    program (power of two >= 16; capped at the padded value dim): smaller tiles mean more programs, each redoing the
    [C, C] score block. None picks 64, halved (down to 16) while the grid has fewer than `_MIN_PROGRAMS` programs:
    each program is a sequential scan, so at long T with few sequences and heads (B * N of 16 at 32k tokens) the
    grid, not the arithmetic, bounds the speed. This rule is reasoned, not yet tuned on a GPU. num_warps: None
    picks 4 up to head dim 64, else 8. interpret: run in the Pallas interpreter (any backend, slowly); None reads
    ATTNX_PALLAS_INTERPRET=1.
    """

    name: ClassVar[str] = "pallas_gpu"
    block_size: int = 64
    block_v: int | None = None
    num_warps: int | None = None
    num_stages: int = 2
    interpret: bool | None = None

    def __post_init__(self):
        _pow2_at_least_16("LinearScanPallas", "block_size", self.block_size)
        if self.block_v is not None:
            _pow2_at_least_16("LinearScanPallas", "block_v", self.block_v)
        if self.num_warps is not None and self.num_warps not in (1, 2, 4, 8, 16):
            raise ValueError(f"LinearScanPallas.num_warps: expected None or one of 1, 2, 4, 8, 16, got "
                             f"{self.num_warps!r}")
        if isinstance(self.num_stages, bool) or not isinstance(self.num_stages, int) or self.num_stages < 1:
            raise ValueError(f"LinearScanPallas.num_stages: expected a positive int, got {self.num_stages!r}")
        if self.interpret is not None and not isinstance(self.interpret, bool):
            raise ValueError(f"LinearScanPallas.interpret: expected None, True or False, got {self.interpret!r}")

    def resolved_interpret(self) -> bool:
        if self.interpret is not None:
            return self.interpret
        return os.environ.get("ATTNX_PALLAS_INTERPRET", "0").lower() in ("1", "true", "yes")


@dataclasses.dataclass(frozen=True)
class _Plan:
    """Everything static about one call (hashable: the custom_jvp's non-differentiable argument)."""

    N: int  # query heads
    G: int  # query heads per kv head
    Tp: int  # padded length, a multiple of C
    Hp: int
    Vp: int
    C: int  # block_size
    BV: int  # block_v
    decay: bool  # False: slopes None, no exp at all
    num_warps: int
    num_stages: int
    interpret: bool
    slope_grad: bool = True  # with decay: the backward also computes dL/ds (off when the slopes are not perturbed)

    @property
    def num_blocks(self) -> int:
        return self.Tp // self.C

    @property
    def ds(self) -> bool:
        return self.decay and self.slope_grad


def _mma(a, b, trans_a: bool, trans_b: bool):
    dims = (((0 if trans_a else 1,), (1 if trans_b else 0,)), ((), ()))
    precision = lax.Precision.HIGHEST if a.dtype == jnp.float32 else None  # IEEE, not TF32, for float32
    return lax.dot_general(a, b, dims, precision=precision, preferred_element_type=jnp.float32)


def _split(x, dtype):
    """x as a sum of `dtype` parts: itself, or float32 x = hi + lo with hi, lo rounded to dtype (8 + 8 bits)."""
    if x.dtype == dtype:
        return (x,)
    hi = x.astype(dtype)
    return hi, (x - hi.astype(jnp.float32)).astype(dtype)


def _dot(a, b, trans_a: bool = False, trans_b: bool = False):
    """a @ b with float32 accumulation. A float32 intermediate (scores, state, decayed rows) meeting a bf16/f16
    operand is split into two parts of that dtype, two MMAs: rounding it once to bf16 (the official kernel) puts
    the unnormalised outputs, which grow with T, outside the bfloat16 tolerance table."""
    low = a.dtype if a.dtype != jnp.float32 else b.dtype
    out = None
    for x in _split(a, low):
        for y in _split(b, low):
            term = _mma(x, y, trans_a, trans_b)
            out = term if out is None else out + term
    return out


class _Decay:
    """The float32 decay factors of one head, built from iotas and the slope (no gathers; Triton-friendly).

    intra [C, C] = Λ (causal mask times lambda^(r - c)); query [C, 1] = lambda^r; key [C, 1] = lambda^(C - c);
    block = lambda^C; the *_gap factors are these times their exponents' distances. Without decay the factors are
    None and intra is the causal mask."""

    def __init__(self, plan: _Plan, s_ref):
        C = plan.C
        r = lax.broadcasted_iota(jnp.int32, (C, C), 0)
        c = lax.broadcasted_iota(jnp.int32, (C, C), 1)
        causal = r >= c
        if not plan.decay:
            self.intra = jnp.where(causal, 1.0, 0.0).astype(jnp.float32)
            self.query = self.key = self.block = None
            return
        s = s_ref[0].astype(jnp.float32)
        gap = jnp.maximum(r - c, 0).astype(jnp.float32)  # max: exp of a positive gap could overflow
        self.intra = jnp.where(causal, jnp.exp(-s * gap), 0.0)
        row = lax.broadcasted_iota(jnp.int32, (C, 1), 0).astype(jnp.float32)
        self.query = jnp.exp(-s * row)
        self.key = jnp.exp(-s * (C - row))
        self.block = jnp.exp(-s * C)
        # -d/ds of the same factors over their exponents (for the slope gradient): gap Λ, r lambda^r, (C-c) lambda^(C-c)
        self.intra_gap = gap * self.intra
        self.query_gap = row * self.query
        self.key_gap = (C - row) * self.key


def _scaled(x, factor):
    return x if factor is None else x * factor


# ---- Forward: one program per (batch * head, value tile), blocks in order ----

def _forward_kernel(*refs, plan: _Plan):
    s_ref, (q_ref, k_ref, v_ref, o_ref) = (refs[0], refs[1:]) if plan.decay else (None, refs)
    C = plan.C
    decay = _Decay(plan, s_ref)

    def body(i, kv):
        rows = pl.ds(pl.multiple_of(i * C, C), C)
        q, k, v = q_ref[rows, :], k_ref[rows, :], v_ref[rows, :]
        scores = _dot(q, k, trans_b=True) * decay.intra  # [C, C]
        out = _dot(scores, v) + _scaled(_dot(q, kv), decay.query)
        o_ref[rows, :] = out.astype(o_ref.dtype)
        update = _dot(_scaled(k, decay.key), v, trans_a=True)  # [Hp, BV]
        return _scaled(kv, decay.block) + update

    lax.fori_loop(0, plan.num_blocks, body, jnp.zeros((plan.Hp, plan.BV), jnp.float32))


def _specs(plan: _Plan):
    """BlockSpecs on the (B * N, Vp / BV) grid: whole sequences of one head (rows are sliced in the kernel)."""
    N, G, Tp = plan.N, plan.G, plan.Tp
    query = lambda width: pl.BlockSpec((None, Tp, None, width), lambda bn, j: (bn // N, 0, bn % N, 0))
    kv_head = lambda width: pl.BlockSpec((None, Tp, None, width), lambda bn, j: (bn // N, 0, (bn % N) // G, 0))
    return dict(
        slope=pl.BlockSpec((1,), lambda bn, j: (bn % N,)),  # one float per head, read as a scalar
        q=query(plan.Hp), k=kv_head(plan.Hp),
        v=pl.BlockSpec((None, Tp, None, plan.BV), lambda bn, j: (bn // N, 0, (bn % N) // G, j)),
        o=pl.BlockSpec((None, Tp, None, plan.BV), lambda bn, j: (bn // N, 0, bn % N, j)),
        # float32 partial over value tiles: [Vp / BV, B, Tp, N, Hp]
        partial=pl.BlockSpec((None, None, Tp, None, plan.Hp), lambda bn, j: (j, bn // N, 0, bn % N, 0)),
    )


def _call(plan: _Plan, kernel, name, s, inputs, outs):
    """pallas_call over the (B * N, Vp / BV) grid; `inputs`/`outs` are (spec name, array or shape) pairs."""
    specs = _specs(plan)
    B = inputs[0][1].shape[0]
    args = ([s] if plan.decay else []) + [x for _, x in inputs]
    in_specs = ([specs["slope"]] if plan.decay else []) + [specs[n] for n, _ in inputs]
    return pl.pallas_call(
        functools.partial(kernel, plan=plan), grid=(B * plan.N, plan.Vp // plan.BV),
        in_specs=in_specs, out_specs=[specs[n] for n, _ in outs], out_shape=[o for _, o in outs],
        compiler_params=plgpu.CompilerParams(num_warps=plan.num_warps, num_stages=plan.num_stages),
        interpret=plan.interpret, name=name)(*args)


def _forward(plan: _Plan, q, k, v, s):
    B = q.shape[0]
    out = jax.ShapeDtypeStruct((B, plan.Tp, plan.N, plan.Vp), q.dtype)
    return _call(plan, _forward_kernel, "lightning_forward", s, [("q", q), ("k", k), ("v", v)], [("o", out)])[0]


# ---- Backward: dQ (forward loop) ----

def _dq_kernel(*refs, plan: _Plan):
    """dQ; with decay also the slope gradient's terms -dL/ds per (row, value column), carrying a second state
    KV' = sum_j (iC - j) lambda^(iC - j) k_j v_j^T = -dKV/ds beside KV (module docstring)."""
    s_ref, refs = (refs[0], refs[1:]) if plan.decay else (None, refs)
    q_ref, k_ref, v_ref, do_ref, dq_ref = refs[:5]
    ds_ref = refs[5] if plan.ds else None
    C = plan.C
    decay = _Decay(plan, s_ref)

    def body(i, carry):
        kv, kv_gap = carry
        rows = pl.ds(pl.multiple_of(i * C, C), C)
        k, v, do = k_ref[rows, :], v_ref[rows, :], do_ref[rows, :]
        dp = _dot(do, v, trans_b=True) * decay.intra  # [C, C]: dL/d(scores), masked and decayed
        dq = _dot(dp, k) + _scaled(_dot(do, kv, trans_b=True), decay.query)
        dq_ref[rows, :] = dq
        kv_next = _scaled(kv, decay.block) + _dot(_scaled(k, decay.key), v, trans_a=True)
        if not plan.ds:
            return kv_next, kv_gap
        q = q_ref[rows, :]
        # sum_{j <= t} (t - j) lambda^(t - j) (q_t . k_j) v_j, row by row; dotted with dO it is -dL/ds
        weighted = (_dot(_dot(q, k, trans_b=True) * decay.intra_gap, v) + _dot(q, kv) * decay.query_gap
                    + _dot(q, kv_gap) * decay.query)
        ds_ref[rows, :] = -(weighted * do.astype(jnp.float32))
        kv_gap = decay.block * (C * kv + kv_gap) + _dot(k * decay.key_gap, v, trans_a=True)
        return kv_next, kv_gap

    zeros = jnp.zeros((plan.Hp, plan.BV), jnp.float32)
    lax.fori_loop(0, plan.num_blocks, body, (zeros, zeros))


# ---- Backward: dK, dV (reverse loop over dKV) ----

def _dkdv_kernel(*refs, plan: _Plan):
    s_ref, (q_ref, k_ref, v_ref, do_ref, dk_ref, dv_ref) = (refs[0], refs[1:]) if plan.decay else (None, refs)
    C, nb = plan.C, plan.num_blocks
    decay = _Decay(plan, s_ref)

    def body(i, dkv):
        rows = pl.ds(pl.multiple_of((nb - 1 - i) * C, C), C)
        q, k, v, do = q_ref[rows, :], k_ref[rows, :], v_ref[rows, :], do_ref[rows, :]
        dp = _dot(do, v, trans_b=True) * decay.intra  # [C, C], row r = query, column c = key
        p = _dot(q, k, trans_b=True) * decay.intra
        dk = _dot(dp, q, trans_a=True) + _scaled(_dot(v, dkv, trans_b=True),
                                                                  decay.key)
        dv = _dot(p, do, trans_a=True) + _scaled(_dot(k, dkv), decay.key)
        dk_ref[rows, :] = dk
        dv_ref[rows, :] = dv
        return _scaled(dkv, decay.block) + _dot(_scaled(q, decay.query), do, trans_a=True)

    lax.fori_loop(0, nb, body, jnp.zeros((plan.Hp, plan.BV), jnp.float32))


def _backward(plan: _Plan, q, k, v, s, do):
    B = q.shape[0]
    nv = plan.Vp // plan.BV
    partial = jax.ShapeDtypeStruct((nv, B, plan.Tp, plan.N, plan.Hp), jnp.float32)
    dv_shape = jax.ShapeDtypeStruct((B, plan.Tp, plan.N, plan.Vp), jnp.float32)
    dq_outs = _call(plan, _dq_kernel, "lightning_dq", s, [("q", q), ("k", k), ("v", v), ("o", do)],
                    [("partial", partial)] + ([("o", dv_shape)] if plan.ds else []))
    ds = jnp.sum(dq_outs[1], axis=(0, 1, 3)) if plan.ds else None  # [N]
    dk_part, dv = _call(plan, _dkdv_kernel, "lightning_dkdv", s, [("q", q), ("k", k), ("v", v), ("o", do)],
                        [("partial", partial), ("o", dv_shape)])
    # per query head: [B, Tp, N, Hp], [B, Tp, N, Hp], [B, Tp, N, Vp]; ds [N] or None
    return dq_outs[0].sum(0), dk_part.sum(0), dv, ds


# ---- forward and reverse mode over padded arrays ----

def scan_tangent(forward, diff: dict, t: dict, tokens_major=lambda x: x, heads_major=lambda x: x):
    """Forward-mode tangent of a scan kernel's output. The output is linear in each of q, k and v (decay fixed), so
    dO = F(dq, k, v) + F(q, dk, v) + F(q, k, dv) with the forward kernel F itself, one call per perturbed input.
    The decay term (slopes perturbed in forward mode, rare) is the jvp of `lightning_chunked` in s: the kernel's own
    blockwise form, no T-sized cancellation. `tokens_major`/`heads_major` convert the kernel layout to and from
    the [B, T, N, H] layout of lightning_chunked."""
    from attnx.ops.linear.chunked import lightning_chunked

    q, k, v, s = diff["q"], diff["k"], diff["v"], diff.get("s")
    terms = []
    for name in ("q", "k", "v"):
        if name in t:  # the forward with this one input replaced by its tangent
            qkv = dict(q=q, k=k, v=v)
            qkv[name] = t[name].astype(qkv[name].dtype)
            terms.append(forward(qkv["q"], qkv["k"], qkv["v"], s))
    if "s" in t:
        qt, kt, vt = tokens_major(q), tokens_major(k), tokens_major(v)
        _, ds = jax.jvp(lambda x: lightning_chunked(qt, kt, vt, x).astype(jnp.float32), (s,),
                        (t["s"].astype(s.dtype),))
        terms.append(heads_major(ds))
    return sum(x.astype(jnp.float32) for x in terms).astype(q.dtype)


def scan_backward(backward):
    """The reverse-mode rule of `forward_mode.differentiable` around backward(plan, (q, k, v, s), do) -> (dq, dk,
    dv, ds): dL/ds is computed only when the slopes are differentiated (`plan.slope_grad`)."""

    def rule(plan, diff, rest, out, cts_and_names):
        do, names = cts_and_names
        plan = dataclasses.replace(plan, slope_grad="s" in names)
        grads = dict(zip("qkvs", backward(plan, (diff["q"], diff["k"], diff["v"], diff.get("s")), do)))
        return {n: grads[n] for n in names}

    return rule


def _scan_bwd(plan: _Plan, res, do):
    q, k, v, s = res
    dq, dk_heads, dv_heads, ds = _backward(plan, q, k, v, s, do.astype(q.dtype))
    B, Tp, N = q.shape[:3]
    K = N // plan.G
    dk = dk_heads.reshape(B, Tp, K, plan.G, plan.Hp).sum(3)  # GQA: the group's query heads share the kv head
    dv = dv_heads.reshape(B, Tp, K, plan.G, plan.Vp).sum(3)
    ds = None if ds is None else ds.astype(s.dtype)
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), ds


# jax.jvp: the forward kernel on the tangents (scan_tangent); jax.grad: Algorithm 2's kernels (its transpose).
_scan = forward_mode.differentiable(
    lambda plan, diff, rest: _forward(plan, diff["q"], diff["k"], diff["v"], diff.get("s")),
    lambda plan, diff, rest, out, t: scan_tangent(functools.partial(_forward, plan), diff, t),
    scan_backward(_scan_bwd))


# ---- Public entry ----

_MIN_PROGRAMS = 256  # about two programs per SM of an H100 (132 SMs)


def _value_tile(block_v: int | None, Vp: int, sequences: int) -> int:
    if block_v is not None:
        return min(block_v, Vp)
    bv = min(64, Vp)
    while bv > 16 and sequences * (Vp // bv) < _MIN_PROGRAMS:
        bv //= 2
    return bv


def _pow2_block(n: int) -> int:
    return max(16, pl.next_power_of_2(n))


def _pad(x, sizes):
    widths = [(0, size - dim) for dim, size in zip(x.shape, sizes)]
    return jnp.pad(x, widths) if any(w for _, w in widths) else x


def checked_entry(owner: str, config, config_type: type, kernel: str, backend: str, q, k, v, slopes):
    """The entry checks both scan kernels share: the config's type, the inputs (`check_inputs`) and that the kernel
    can run here (on its `backend`, or interpreted). Returns (canonical args, slopes, interpret)."""
    if not isinstance(config, config_type):
        raise ValueError(f"{owner}.config: expected a {config_type.__name__}, got {config!r}")
    args, slopes = check_inputs(owner, q, k, v, slopes)
    interpret = config.resolved_interpret()
    if not interpret and jax.default_backend() != backend:
        raise NotImplementedError(f"{owner}: the {kernel} kernel needs a {backend.upper()} (backend is "
                                  f"{jax.default_backend()!r}); pass interpret=True or set ATTNX_PALLAS_INTERPRET=1 "
                                  "to run it in the Pallas interpreter")
    return args, slopes, interpret


def check_inputs(owner: str, q, k, v, slopes):
    """Shapes as `lightning_chunked` takes them (after `canonicalize`), self attention, slopes None or float [N]."""
    args = canonicalize(q, k, v)
    T, N, S = args.q.shape[1], args.q.shape[2], args.k.shape[1]
    if S != T:
        raise ValueError(f"{owner}: causal self attention only, got query length {T} and key length {S}")
    if slopes is not None:
        slopes = jnp.asarray(slopes)
        if slopes.shape != (N,) or not jnp.issubdtype(slopes.dtype, jnp.floating):
            raise ValueError(f"{owner}.slopes: expected None or a float array of shape [N] = ({N},) (one decay rate "
                             f"per query head), got {slopes.dtype}{list(slopes.shape)}")
    return args, slopes


def lightning_pallas(q, k, v, slopes=None, *, block_size: int = 64, block_v: int | None = None,
                     num_warps: int | None = None,
                     num_stages: int = 2, interpret: bool | None = None):
    """Causal decayed linear attention in the Lightning Attention-2 Pallas kernel -> [*B, T, N, V], q's dtype.

    q [*B, T, N, H], k [*B, T, K, H], v [*B, T, K, V] with K dividing N (GQA); slopes: [N] decay rates s >= 0
    (lambda = exp(-s); differentiable), or None for no decay (plain causal linear attention, no exp in the kernel;
    note that `lightning_attention` instead defaults to ALiBi slopes). Same semantics as
    `attnx.ops.linear.chunked.lightning_chunked`; any length. See `LinearScanPallas` for the tile options.
    Raises NotImplementedError off GPU unless interpret mode is on (interpret=True or ATTNX_PALLAS_INTERPRET=1).
    """
    config = LinearScanPallas(block_size=block_size, block_v=block_v, num_warps=num_warps, num_stages=num_stages,
                              interpret=interpret)
    return lightning_pallas_with_config(q, k, v, slopes, config)


def lightning_pallas_with_config(q, k, v, slopes, config: LinearScanPallas):
    """`lightning_pallas` with its options as one `LinearScanPallas` (what the mechanisms' dispatch passes)."""
    args, slopes, interpret = checked_entry("lightning_pallas", config, LinearScanPallas, "Triton", "gpu", q, k, v,
                                            slopes)
    B, T, N, H = args.q.shape
    K, V = args.k.shape[2], args.v.shape[-1]
    out_dtype = args.q.dtype
    if B * T == 0:
        return jnp.zeros((*args.batch_shape, T, N, V), out_dtype)
    dtype = jnp.result_type(args.q, args.k, args.v)
    C = min(config.block_size, _pow2_block(T))
    Tp, Hp, Vp = -(-T // C) * C, _pow2_block(H), _pow2_block(V)
    BV = _value_tile(config.block_v, Vp, B * N)
    plan = _Plan(N=N, G=N // K, Tp=Tp, Hp=Hp, Vp=Vp, C=C, BV=BV, decay=slopes is not None,
                 num_warps=config.num_warps or (4 if max(Hp, BV) <= 64 else 8), num_stages=config.num_stages,
                 interpret=interpret)
    qp = _pad(args.q.astype(dtype), (B, Tp, N, Hp))
    kp = _pad(args.k.astype(dtype), (B, Tp, K, Hp))
    vp = _pad(args.v.astype(dtype), (B, Tp, K, Vp))
    s = None if slopes is None else slopes.astype(jnp.float32)
    diff = dict(q=qp, k=kp, v=vp) if s is None else dict(q=qp, k=kp, v=vp, s=s)
    out = _scan(plan, diff, ())[:, :T, :, :V]
    return out.reshape(*args.batch_shape, T, N, V).astype(out_dtype)


def scan_config(owner: str, implementation, block_size: int):
    """The scan kernel that a mechanism's `implementation=` asks for: a `LinearScanPallas` / `LinearScanPallasTpu`
    as given; the names "pallas_gpu" / "pallas_tpu" as the defaults with the caller's block_size; anything else
    None (not a Pallas scan)."""
    from attnx.ops.linear.pallas_tpu import LinearScanPallasTpu  # that module builds on this one

    if isinstance(implementation, (LinearScanPallas, LinearScanPallasTpu)):
        return implementation
    if isinstance(implementation, str) and implementation == "pallas_gpu":
        if not isinstance(block_size, int) or block_size < 16 or block_size & (block_size - 1):
            raise ValueError(f"{owner}.block_size: implementation 'pallas_gpu' needs a power of two >= 16 (Triton "
                             f"dot tiles), got {block_size!r}")
        return LinearScanPallas(block_size=block_size)
    if isinstance(implementation, str) and implementation == "pallas_tpu":
        if not isinstance(block_size, int) or block_size < 128 or block_size % 128:
            raise ValueError(f"{owner}.block_size: implementation 'pallas_tpu' needs a multiple of 128 (TPU lane "
                             f"tiles), got {block_size!r}")
        return LinearScanPallasTpu(block_size=block_size)
    return None


def run_scan(q, k, v, slopes, config):
    """The Pallas scan of `config` (from `scan_config`): the Triton kernel or the Mosaic one."""
    if isinstance(config, LinearScanPallas):
        return lightning_pallas_with_config(q, k, v, slopes, config)
    from attnx.ops.linear.pallas_tpu import lightning_pallas_tpu_with_config

    return lightning_pallas_tpu_with_config(q, k, v, slopes, config)
