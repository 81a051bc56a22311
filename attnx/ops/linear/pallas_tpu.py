"""Pallas TPU (Mosaic) kernel of decayed causal linear attention: the Lightning Attention-2 tiling.

Qin et al., 2024, "Lightning Attention-2", arXiv 2401.04658, Algorithm 1 (forward) and Algorithm 2 (backward); the
same block equations as `attnx.ops.linear.pallas_gpu` (see its docstring), laid out for Mosaic:

- Grid (batch * query head, block), the block axis "arbitrary" (sequential on one core) and the head axis
  "parallel"; the [H, V] float32 state lives in a VMEM scratch that survives from one block's grid step to the
  next and is zeroed at block 0. Mosaic's pipeline double-buffers the next block's q/k/v tiles while the MXU works,
  instead of a loop inside the kernel as on GPU. The dK/dV kernel walks the blocks backwards through its index maps.
- The wrapper transposes to [B, N, T, H] so that every block's last two dims are (C, H) with C a multiple of 128
  and H, V zero-padded to multiples of 128 (the (8, 128) tiling; the [C, C] score tile is lane-aligned too).
- The slopes are scalar-prefetched into SMEM (PrefetchScalarGridSpec); decays are built from 2-D iotas as full
  tiles (no [C, 1] columns), and a^T b products transpose float32 tiles explicitly (`.T`), as JAX's TPU flash
  attention does.
- Precision: MXU products on the input dtype with float32 accumulation; a float32 intermediate meeting a bf16 operand
  enters as hi + lo parts of that dtype (as on GPU), so bf16 results stay inside the tolerance table.

Backward (reverse mode of `attnx.ops.forward_mode.differentiable`): dQ in a forward pass, dK/dV in a reverse pass
over dKV, per query head in float32; the wrapper sums the G query heads of each kv head (GQA); the dQ pass also
writes the slope gradient's terms, with a second VMEM state KV' (see pallas_gpu's docstring). Forward mode: the
forward kernel on each perturbed input's tangent (`pallas_gpu.scan_tangent`).
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
from jax.experimental.pallas import tpu as pltpu

from attnx.ops import forward_mode
from attnx.ops.linear.pallas_gpu import _pad, _split, checked_entry, scan_backward, scan_tangent

_LANES = 128


@dataclasses.dataclass(frozen=True)
class LinearScanPallasTpu:
    """Configuration of the Mosaic scan kernel. block_size: rows per block C, a positive multiple of 128 (the lane
    width of the [C, C] score tile). interpret: run in the Pallas interpreter (any backend, slowly); None reads
    ATTNX_PALLAS_INTERPRET=1."""

    name: ClassVar[str] = "pallas_tpu"
    block_size: int = 128
    interpret: bool | None = None

    def __post_init__(self):
        b = self.block_size
        if isinstance(b, bool) or not isinstance(b, int) or b < _LANES or b % _LANES:
            raise ValueError(f"LinearScanPallasTpu.block_size: expected a positive multiple of 128 (TPU lane tiles), "
                             f"got {b!r}")
        if self.interpret is not None and not isinstance(self.interpret, bool):
            raise ValueError(f"LinearScanPallasTpu.interpret: expected None, True or False, got {self.interpret!r}")

    def resolved_interpret(self) -> bool:
        if self.interpret is not None:
            return self.interpret
        return os.environ.get("ATTNX_PALLAS_INTERPRET", "0").lower() in ("1", "true", "yes")


@dataclasses.dataclass(frozen=True)
class _Plan:
    N: int
    G: int
    Tp: int
    Hp: int
    Vp: int
    C: int
    decay: bool
    interpret: bool
    slope_grad: bool = True  # with decay: the backward also computes dL/ds (off when the slopes are not perturbed)

    @property
    def num_blocks(self) -> int:
        return self.Tp // self.C

    @property
    def ds(self) -> bool:
        return self.decay and self.slope_grad


def _mma(a, b, trans_b: bool):
    dims = (((1,), (1 if trans_b else 0,)), ((), ()))
    precision = lax.Precision.HIGHEST if a.dtype == jnp.float32 else None
    return lax.dot_general(a, b, dims, precision=precision, preferred_element_type=jnp.float32)


def _dot(a, b, trans_b: bool = False):
    """a @ b (or a @ b^T) with float32 accumulation; float32 intermediates split into two parts of the other
    operand's dtype (see `pallas_gpu._dot`)."""
    low = a.dtype if a.dtype != jnp.float32 else b.dtype
    out = None
    for x in _split(a, low):
        for y in _split(b, low):
            term = _mma(x, y, trans_b)
            out = term if out is None else out + term
    return out


class _Decay:
    """Float32 decay tiles of one head from 2-D iotas: intra [C, C] = Λ, query(w) [C, w] = lambda^r,
    key(w) [C, w] = lambda^(C - c), block(w) [1, w] = lambda^C, and the *_gap factors of the slope gradient.
    Without decay: the causal mask, and the others are identities (never called for the gap factors)."""

    def __init__(self, plan: _Plan, s_ref):
        self.plan = plan
        C = plan.C
        r = lax.broadcasted_iota(jnp.int32, (C, C), 0)
        c = lax.broadcasted_iota(jnp.int32, (C, C), 1)
        if not plan.decay:
            self.s = None
            self.intra = jnp.where(r >= c, 1.0, 0.0).astype(jnp.float32)
            return
        self.s = s_ref[lax.rem(pl.program_id(0), plan.N)]
        gap = jnp.maximum(r - c, 0).astype(jnp.float32)
        self.intra = jnp.where(r >= c, jnp.exp(-self.s * gap), 0.0)
        self.intra_gap = gap * self.intra  # -d/ds of Λ

    def _rows(self, width: int):
        return lax.broadcasted_iota(jnp.int32, (self.plan.C, width), 0).astype(jnp.float32)

    def query(self, x):
        return x if self.s is None else x * jnp.exp(-self.s * self._rows(x.shape[1]))

    def key(self, x):
        return x if self.s is None else x * jnp.exp(-self.s * (self.plan.C - self._rows(x.shape[1])))

    def query_gap(self, x):
        """x * r lambda^r (-d/ds of lambda^r)."""
        rows = self._rows(x.shape[1])
        return x * (rows * jnp.exp(-self.s * rows))

    def key_gap(self, x):
        """x * (C - c) lambda^(C - c) (-d/ds of lambda^(C - c))."""
        distance = self.plan.C - self._rows(x.shape[1])
        return x * (distance * jnp.exp(-self.s * distance))

    def block(self, state):
        if self.s is None:
            return state
        return state * jnp.exp(-self.s * (self.plan.C - self._rows(state.shape[1])))[0:1, :]  # row 0: lambda^C


def _t(x):
    """Transpose through float32 (Mosaic transposes 32-bit tiles)."""
    return x.astype(jnp.float32).T


# ---- kernels (grid (B * N, num_blocks); scratch: the [Hp, Vp] float32 state) ----

def _forward_kernel(s_ref, q_ref, k_ref, v_ref, o_ref, kv_ref, *, plan: _Plan):
    @pl.when(pl.program_id(1) == 0)
    def _():
        kv_ref[...] = jnp.zeros_like(kv_ref)

    decay = _Decay(plan, s_ref)
    q, k, v, kv = q_ref[...], k_ref[...], v_ref[...], kv_ref[...]
    scores = _dot(q, k, trans_b=True) * decay.intra
    o_ref[...] = (_dot(scores, v) + decay.query(_dot(q, kv))).astype(o_ref.dtype)
    kv_ref[...] = decay.block(kv) + _dot(_t(decay.key(k.astype(jnp.float32))), v)


def _dq_kernel(s_ref, q_ref, k_ref, v_ref, do_ref, *refs, plan: _Plan):
    """dQ; with decay also -dL/ds per (row, value column) with the second state KV' (see pallas_gpu's docstring)."""
    (dq_ref, ds_ref, kv_ref, kv_gap_ref) = refs if plan.ds else (refs[0], None, refs[1], None)

    @pl.when(pl.program_id(1) == 0)
    def _():
        kv_ref[...] = jnp.zeros_like(kv_ref)
        if plan.ds:
            kv_gap_ref[...] = jnp.zeros_like(kv_gap_ref)

    decay = _Decay(plan, s_ref)
    k, v, do, kv = k_ref[...], v_ref[...], do_ref[...], kv_ref[...]
    dp = _dot(do, v, trans_b=True) * decay.intra
    dq_ref[...] = _dot(dp, k) + decay.query(_dot(do, kv, trans_b=True))
    kv_ref[...] = decay.block(kv) + _dot(_t(decay.key(k.astype(jnp.float32))), v)
    if plan.ds:
        q, kv_gap = q_ref[...], kv_gap_ref[...]
        weighted = (_dot(_dot(q, k, trans_b=True) * decay.intra_gap, v) + decay.query_gap(_dot(q, kv))
                    + decay.query(_dot(q, kv_gap)))
        ds_ref[...] = -(weighted * do.astype(jnp.float32))
        kv_gap_ref[...] = decay.block(plan.C * kv + kv_gap) + _dot(_t(decay.key_gap(k.astype(jnp.float32))), v)


def _dkdv_kernel(s_ref, q_ref, k_ref, v_ref, do_ref, dk_ref, dv_ref, dkv_ref, *, plan: _Plan):
    @pl.when(pl.program_id(1) == 0)  # the first grid step is the last block (reverse index maps)
    def _():
        dkv_ref[...] = jnp.zeros_like(dkv_ref)

    decay = _Decay(plan, s_ref)
    q, k, v, do, dkv = q_ref[...], k_ref[...], v_ref[...], do_ref[...], dkv_ref[...]
    dp = _dot(do, v, trans_b=True) * decay.intra  # [C, C]: rows are queries, columns keys
    p = _dot(q, k, trans_b=True) * decay.intra
    dk_ref[...] = _dot(dp.T, q) + decay.key(_dot(v, dkv, trans_b=True))
    dv_ref[...] = _dot(p.T, do) + decay.key(_dot(k, dkv))
    dkv_ref[...] = decay.block(dkv) + _dot(_t(decay.query(q.astype(jnp.float32))), do)


def _call(plan: _Plan, kernel, name, s, inputs, outputs, reverse: bool = False, states: int = 1):
    """inputs/outputs: (kind, array or ShapeDtypeStruct, width) with kind "query" (per query head) or "kv"."""
    N, G, C, nb = plan.N, plan.G, plan.C, plan.num_blocks
    block = (lambda i: nb - 1 - i) if reverse else (lambda i: i)

    def spec(kind, width):
        # lax.div/rem, not // and %: jnp's floor semantics add a sign() that Mosaic lowers only on a TPU host
        head = (lambda bn: lax.rem(bn, N)) if kind == "query" else (lambda bn: lax.div(lax.rem(bn, N), G))
        return pl.BlockSpec((None, None, C, width), lambda bn, i, s_ref: (lax.div(bn, N), head(bn), block(i), 0))

    B = inputs[0][1].shape[0]
    return pl.pallas_call(
        functools.partial(kernel, plan=plan),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=1, grid=(B * N, nb),
            in_specs=[spec(kind, w) for kind, _, w in inputs], out_specs=[spec(kind, w) for kind, _, w in outputs],
            scratch_shapes=[pltpu.VMEM((plan.Hp, plan.Vp), jnp.float32)] * states),
        out_shape=[o for _, o, _ in outputs],
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "arbitrary")),
        interpret=plan.interpret, name=name)(s, *[x for _, x, _ in inputs])


def _forward(plan: _Plan, q, k, v, s):
    out = jax.ShapeDtypeStruct((q.shape[0], plan.N, plan.Tp, plan.Vp), q.dtype)
    return _call(plan, _forward_kernel, "lightning_tpu_forward", s,
                 [("query", q, plan.Hp), ("kv", k, plan.Hp), ("kv", v, plan.Vp)], [("query", out, plan.Vp)])[0]


def _scan_bwd(plan: _Plan, res, do):
    q, k, v, s = res  # [B, N, Tp, Hp], [B, K, Tp, Hp], [B, K, Tp, Vp], [N]
    do = do.astype(q.dtype)
    B, K = q.shape[0], k.shape[1]
    f32 = lambda width: jax.ShapeDtypeStruct((B, plan.N, plan.Tp, width), jnp.float32)
    dq, *ds_terms = _call(
        plan, _dq_kernel, "lightning_tpu_dq", s,
        [("query", q, plan.Hp), ("kv", k, plan.Hp), ("kv", v, plan.Vp), ("query", do, plan.Vp)],
        [("query", f32(plan.Hp), plan.Hp)] + ([("query", f32(plan.Vp), plan.Vp)] if plan.ds else []),
        states=2 if plan.ds else 1)
    dk_heads, dv_heads = _call(
        plan, _dkdv_kernel, "lightning_tpu_dkdv", s,
        [("query", q, plan.Hp), ("kv", k, plan.Hp), ("kv", v, plan.Vp), ("query", do, plan.Vp)],
        [("query", f32(plan.Hp), plan.Hp), ("query", f32(plan.Vp), plan.Vp)], reverse=True)
    group = lambda x: x.reshape(B, K, plan.G, *x.shape[2:]).sum(2)  # GQA: the query heads of one kv head
    ds = jnp.sum(ds_terms[0], axis=(0, 2, 3)).astype(s.dtype) if plan.ds else None
    return dq.astype(q.dtype), group(dk_heads).astype(k.dtype), group(dv_heads).astype(v.dtype), ds


_heads_major = lambda x: jnp.swapaxes(x, 1, 2)  # noqa: E731  [B, T, N, H] <-> [B, N, T, H]

# jax.jvp: the forward kernel on the tangents (scan_tangent); jax.grad: the dQ / dK-dV kernels (its transpose).
_scan = forward_mode.differentiable(
    lambda plan, diff, rest: _forward(plan, diff["q"], diff["k"], diff["v"], diff["s"]),
    lambda plan, diff, rest, out, t: scan_tangent(functools.partial(_forward, plan), diff, t, _heads_major,
                                                  _heads_major),
    scan_backward(_scan_bwd))


def lightning_pallas_tpu(q, k, v, slopes=None, *, block_size: int = 128, interpret: bool | None = None):
    """Causal decayed linear attention in the Mosaic TPU kernel -> [*B, T, N, V] in q's dtype.

    Same arguments and semantics as `attnx.ops.linear.pallas_gpu.lightning_pallas` (slopes [N] or None for no
    decay; differentiable in q, k, v and slopes; GQA; any length). block_size: a multiple of 128. Raises
    NotImplementedError off TPU unless interpret mode is on (interpret=True or ATTNX_PALLAS_INTERPRET=1).
    """
    config = LinearScanPallasTpu(block_size=block_size, interpret=interpret)
    return lightning_pallas_tpu_with_config(q, k, v, slopes, config)


def lightning_pallas_tpu_with_config(q, k, v, slopes, config: LinearScanPallasTpu):
    """`lightning_pallas_tpu` with its options as one `LinearScanPallasTpu` (what the mechanisms' dispatch passes)."""
    args, slopes, interpret = checked_entry("lightning_pallas_tpu", config, LinearScanPallasTpu, "Mosaic", "tpu",
                                            q, k, v, slopes)
    B, T, N, H = args.q.shape
    K, V = args.k.shape[2], args.v.shape[-1]
    out_dtype = args.q.dtype
    if B * T == 0:
        return jnp.zeros((*args.batch_shape, T, N, V), out_dtype)
    dtype = jnp.result_type(args.q, args.k, args.v)
    C = config.block_size
    round_up = lambda n, m: -(-n // m) * m
    Tp, Hp, Vp = round_up(T, C), round_up(H, _LANES), round_up(V, _LANES)
    plan = _Plan(N=N, G=N // K, Tp=Tp, Hp=Hp, Vp=Vp, C=C, decay=slopes is not None, interpret=interpret)
    heads_first = lambda x, heads, width: jnp.swapaxes(_pad(x.astype(dtype), (B, Tp, heads, width)), 1, 2)
    s = jnp.zeros((N,), jnp.float32) if slopes is None else slopes.astype(jnp.float32)  # read only with decay
    out = _scan(plan, dict(q=heads_first(args.q, N, Hp), k=heads_first(args.k, K, Hp), v=heads_first(args.v, K, Vp),
                           s=s), ())
    out = jnp.swapaxes(out, 1, 2)[:, :T, :, :V]
    return out.reshape(*args.batch_shape, T, N, V).astype(out_dtype)
