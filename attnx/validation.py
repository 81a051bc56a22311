"""Input validation and canonicalisation at the public entry (done once, before any implementation runs).

Every error names the argument, the value seen and what is allowed. After `canonicalize`, implementations see one
batch axis and fixed ranks, so none of them re-checks shapes:

    q [B, T, N, H]   k [B, S, K, H]   v [B, S, K, V]   bias [B|1, N|1, T|1, S|1] or None   sinks [N] or None
    mask: a `Mask` whose arrays are q_segment_ids [B|1, T], kv_segment_ids [B|1, S], q_lengths [B|1],
          kv_lengths [B|1], block_mask [B|1, N|1, nT, nS], dense [B|1, N|1, T|1, S]
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from attnx.mask import Mask

__all__ = ["AttentionArgs", "canonicalize", "refuse_self_and_causal"]


@dataclasses.dataclass(frozen=True)
class AttentionArgs:
    """Canonical arguments handed to every implementation (see the module docstring for shapes)."""

    q: jax.Array
    k: jax.Array
    v: jax.Array
    bias: jax.Array | None
    mask: Mask
    scale: float
    logits_soft_cap: float | None
    sinks: jax.Array | None
    score_mod: Callable | None
    mask_mod: Callable | None
    batch_shape: tuple[int, ...]

    @property
    def shape_info(self) -> dict:
        B, T, N, H = self.q.shape
        _, S, K, V = self.v.shape
        return dict(B=B, T=T, S=S, N=N, K=K, H=H, V=V)


def _shape_of(x: Any) -> tuple[int, ...]:
    return tuple(np.shape(x))


def _describe(x: Any) -> str:
    dtype = getattr(x, "dtype", None)
    return f"{dtype}{list(_shape_of(x))}" if dtype is not None else repr(x)


def _as_array(name: str, x: Any) -> jax.Array:
    if isinstance(x, (jax.Array, np.ndarray)) or hasattr(x, "__jax_array__"):
        return jnp.asarray(x)
    if isinstance(x, (list, tuple, int, float, np.generic)):
        return jnp.asarray(x)
    raise TypeError(f"{name}: expected an array, got {type(x).__name__}")


def _check_float(name: str, x: jax.Array) -> None:
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"{name}: expected a floating dtype (float32, bfloat16, float16, float64), got {x.dtype}")


def _check_int(name: str, x: jax.Array) -> None:
    if not jnp.issubdtype(x.dtype, jnp.integer):
        raise TypeError(f"{name}: expected an integer dtype, got {x.dtype}")


def _flatten_batch(name: str, x: jax.Array, n_trailing: int, batch_shape: tuple[int, ...]) -> jax.Array:
    """Broadcast the leading dims of `x` (all but `n_trailing`) against `batch_shape`, flatten them to one axis of
    size prod(batch_shape), or 1 when `x` does not vary over the batch."""
    lead = x.shape[: x.ndim - n_trailing]
    trail = x.shape[x.ndim - n_trailing:]
    if len(lead) > len(batch_shape):
        raise ValueError(f"{name}: has {len(lead)} leading batch dims {lead}, but query has only "
                         f"{len(batch_shape)} batch dims {batch_shape}")
    lead = (1,) * (len(batch_shape) - len(lead)) + lead
    for got, want in zip(lead, batch_shape):
        if got not in (1, want):
            raise ValueError(f"{name}: batch dims {x.shape[: x.ndim - n_trailing]} do not broadcast to the query's "
                             f"batch dims {batch_shape}")
    x = x.reshape(lead + trail)
    if all(d == 1 for d in lead):
        return x.reshape((1,) + trail)
    return jnp.broadcast_to(x, batch_shape + trail).reshape((math.prod(batch_shape),) + trail)


def _check_trailing(name: str, x: jax.Array, expected: tuple[tuple[str, tuple[int, ...]], ...]) -> None:
    """Check the trailing axes of `x` against allowed sizes; `expected` lists (axis letter, allowed sizes)."""
    if x.ndim < len(expected):
        letters = ", ".join(f"{l}" for l, _ in expected)
        raise ValueError(f"{name}: expected at least {len(expected)} dims [..., {letters}], got shape {x.shape}")
    trail = x.shape[x.ndim - len(expected):]
    for (letter, allowed), got in zip(expected, trail):
        if got not in allowed:
            want = " or ".join(str(a) for a in sorted(set(allowed)))
            raise ValueError(f"{name}: axis {letter} has size {got}, allowed {want} (shape {x.shape})")


def _positive_float(name: str, x: Any, allow_none: bool = True) -> float | None:
    if x is None and allow_none:
        return None
    if isinstance(x, bool) or not isinstance(x, (int, float, np.integer, np.floating)):
        raise TypeError(f"{name}: expected a positive Python float, got {x!r}")
    x = float(x)
    if not math.isfinite(x) or x <= 0:
        raise ValueError(f"{name}: expected a finite value > 0, got {x!r}")
    return x


def _canonical_mask(mask: Any, batch_shape, T: int, S: int, N: int) -> Mask:
    if mask is None:
        return Mask()
    if not isinstance(mask, Mask):
        arr = _as_array("mask", mask)
        if arr.dtype != jnp.bool_:
            raise TypeError(f"mask: expected an attnx.Mask or a bool array [..., T, S], got {_describe(arr)} "
                            "(pass additive float masks as `bias`)")
        mask = Mask(dense=arr)
    fields = {}
    for name, trailing in (("q_segment_ids", (("T", (T,)),)), ("kv_segment_ids", (("S", (S,)),))):
        x = getattr(mask, name)
        if x is not None:
            x = _as_array(f"mask.{name}", x)
            _check_int(f"mask.{name}", x)
            _check_trailing(f"mask.{name}", x, trailing)
            fields[name] = _flatten_batch(f"mask.{name}", x, 1, batch_shape)
    for name in ("q_lengths", "kv_lengths"):
        x = getattr(mask, name)
        if x is not None:
            x = _as_array(f"mask.{name}", x)
            _check_int(f"mask.{name}", x)
            fields[name] = _flatten_batch(f"mask.{name}", x, 0, batch_shape)
    if mask.block_mask is not None:
        bq, bk = mask.block_size
        nT, nS = -(-T // bq), -(-S // bk)
        x = _as_array("mask.block_mask", mask.block_mask)
        if x.dtype != jnp.bool_:
            raise TypeError(f"mask.block_mask: expected a bool array, got {x.dtype}")
        _check_trailing("mask.block_mask", x, (("N", (1, N)), ("nT", (nT,)), ("nS", (nS,)))
                        if x.ndim >= 3 else (("nT", (nT,)), ("nS", (nS,))))
        x = x.reshape((1,) * max(0, 3 - x.ndim) + x.shape)
        fields["block_mask"] = _flatten_batch("mask.block_mask", x, 3, batch_shape)
    if mask.dense is not None:
        x = _as_array("mask.dense", mask.dense)
        if x.dtype != jnp.bool_:
            raise TypeError(f"mask.dense: expected a bool array, got {x.dtype}")
        if x.ndim < 2:
            raise ValueError(f"mask.dense: expected at least 2 dims [..., T, S], got shape {x.shape}")
        _check_trailing("mask.dense", x, (("N", (1, N)), ("T", (1, T)), ("S", (1, S)))
                        if x.ndim >= 3 else (("T", (1, T)), ("S", (1, S))))
        x = x.reshape((1,) * max(0, 3 - x.ndim) + x.shape)
        x = jnp.broadcast_to(x, x.shape[:-1] + (S,))
        fields["dense"] = _flatten_batch("mask.dense", x, 3, batch_shape)
    return mask.replace(**fields) if fields else mask


def _check_mods(score_mod, mask_mod, B: int, G: int, K: int, T: int, S: int) -> None:
    """Trace the user functions abstractly (nothing runs) at the grouped logits shape [B, K, G, T, S] and check
    what they return, so a wrong shape or dtype is reported here rather than deep inside a kernel."""
    shape = (B, K, G, T, S)
    b = jax.ShapeDtypeStruct((B, 1, 1, 1, 1), jnp.int32)
    n = jax.ShapeDtypeStruct((1, K, G, 1, 1), jnp.int32)
    t = jax.ShapeDtypeStruct((T, 1), jnp.int32)
    j = jax.ShapeDtypeStruct((1, S), jnp.int32)
    checks = []
    if score_mod is not None:
        checks.append(("score_mod", score_mod, (jax.ShapeDtypeStruct(shape, jnp.float32), b, n, t, j),
                       "a float array broadcastable to the logits", lambda r: jnp.issubdtype(r.dtype, jnp.floating)))
    if mask_mod is not None:
        checks.append(("mask_mod", mask_mod, (b, n, t, j), "a bool array broadcastable to the logits",
                       lambda r: r.dtype == jnp.bool_))
    for name, fn, example, what, dtype_ok in checks:
        try:
            res = jax.eval_shape(fn, *example)
        except Exception as err:  # noqa: BLE001 - report any failure of the user's function against its name
            raise ValueError(f"{name}: calling it with (score [B, K, G, T, S] float32 for score_mod,) batch "
                             f"[B,1,1,1,1], head [1,K,G,1,1], q_idx [T,1], kv_idx [1,S] int32 failed: {err}") from err
        if not hasattr(res, "shape") or not dtype_ok(res):
            raise TypeError(f"{name}: must return {what}, got {res}")
        try:
            out = np.broadcast_shapes(res.shape, shape)
        except ValueError:
            out = None
        if out != shape:
            raise ValueError(f"{name}: must return {what} [B, K, G, T, S] = {shape}, got shape {res.shape}")


def canonicalize(query, key, value, bias=None, mask=None, *, scale=None, logits_soft_cap=None, sinks=None,
                 score_mod=None, mask_mod=None) -> AttentionArgs:
    """Validate the public arguments and return them in canonical form (see the module docstring)."""
    q = _as_array("query", query)
    k = _as_array("key", key)
    v = _as_array("value", value)
    for name, x in (("query", q), ("key", k), ("value", v)):
        _check_float(name, x)
        if x.ndim < 3:
            raise ValueError(f"{name}: expected rank >= 3 [*B, seq, heads, dim] (rank 3 means no batch dims), "
                             f"got shape {x.shape}")
    if not (q.ndim == k.ndim == v.ndim):
        raise ValueError(f"query/key/value: expected the same rank, got query {q.shape}, key {k.shape}, "
                         f"value {v.shape}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"query/key/value: expected one dtype, got query {q.dtype}, key {k.dtype}, value {v.dtype}")
    batch_shape = q.shape[:-3]
    if k.shape[:-3] != batch_shape or v.shape[:-3] != batch_shape:
        raise ValueError(f"key/value: batch dims {k.shape[:-3]} / {v.shape[:-3]} must equal query's {batch_shape}")
    T, N, H = q.shape[-3:]
    S, K, Hk = k.shape[-3:]
    Sv, Kv, V = v.shape[-3:]
    if Hk != H:
        raise ValueError(f"key: head dim {Hk} must equal query's head dim {H} (query {q.shape}, key {k.shape})")
    if Sv != S:
        raise ValueError(f"value: sequence length {Sv} must equal key's {S} (key {k.shape}, value {v.shape})")
    if Kv != K:
        raise ValueError(f"value: {Kv} heads must equal key's {K} heads (key {k.shape}, value {v.shape})")
    if min(T, N, H, S, K, V) == 0:
        raise ValueError(f"query/key/value: zero-sized axis in query {q.shape}, key {k.shape}, value {v.shape}")
    if N % K != 0:
        raise ValueError(f"key: {K} key/value heads must divide the {N} query heads (N % K == 0 for GQA/MQA), "
                         f"got N={N}, K={K}")
    Bf = math.prod(batch_shape) if batch_shape else 1
    q = q.reshape((Bf, T, N, H))
    k = k.reshape((Bf, S, K, H))
    v = v.reshape((Bf, S, K, V))

    if bias is not None:
        b = _as_array("bias", bias)
        _check_float("bias", b)
        if b.ndim < 2:
            raise ValueError(f"bias: expected [*B|1, N|1, T|1, S] (at least 2 dims), got shape {b.shape}")
        if b.ndim >= 3:
            _check_trailing("bias", b, (("N", (1, N)), ("T", (1, T)), ("S", (1, S))))
        else:
            _check_trailing("bias", b, (("T", (1, T)), ("S", (1, S))))
        b = b.reshape((1,) * max(0, 3 - b.ndim) + b.shape)
        bias = _flatten_batch("bias", b, 3, batch_shape)

    cmask = _canonical_mask(mask, batch_shape, T, S, N)

    if scale is None:
        scale_f = 1.0 / math.sqrt(H)
    else:
        if isinstance(scale, (jax.Array, np.ndarray)) and np.shape(scale) == () and not isinstance(
                scale, jax.core.Tracer) and jnp.issubdtype(scale.dtype, jnp.floating):
            scale = float(scale)  # a concrete 0-d array such as 1 / jnp.sqrt(H)
        if isinstance(scale, bool) or not isinstance(scale, (int, float, np.integer, np.floating)):
            raise TypeError(f"scale: expected a static Python float or None (it is baked into the computation; "
                            f"a traced scale belongs in score_mod), got {scale!r}")
        scale_f = float(scale)
        if not math.isfinite(scale_f):
            raise ValueError(f"scale: expected a finite float, got {scale_f}")
    cap = _positive_float("logits_soft_cap", logits_soft_cap)

    if sinks is not None:
        s = _as_array("sinks", sinks)
        _check_float("sinks", s)
        if s.shape != (N,):
            raise ValueError(f"sinks: expected shape [N] = ({N},) (one logit per query head), got {s.shape}")
        sinks = s
    for name, fn in (("score_mod", score_mod), ("mask_mod", mask_mod)):
        if fn is not None and not callable(fn):
            raise TypeError(f"{name}: expected a callable or None, got {type(fn).__name__}")
    _check_mods(score_mod, mask_mod, Bf, N // K, K, T, S)
    return AttentionArgs(q=q, k=k, v=v, bias=bias, mask=cmask, scale=scale_f, logits_soft_cap=cap, sinks=sinks,
                         score_mod=score_mod, mask_mod=mask_mod, batch_shape=tuple(batch_shape))


def refuse_self_and_causal(name: str, query, key, causal: bool, *, queries: str, keys: str,
                           self_attention_hint: str = "use 'softmax'") -> None:
    """The check of a mechanism registered for non-causal cross attention only (CAB pattern "NC"): `queries`
    attending over all of `keys` (e.g. "image tokens" over "prompt tokens"). It refuses causal=True (the keys have
    no order the queries could respect) and T == S (equal lengths read as self attention, which the mechanism does
    not define: a ViT or DiT layer could otherwise pick it as a token mixer and silently run plain softmax self
    attention). `self_attention_hint` completes "for self attention ...". Shared by structured_cross, region_mask
    and conditional_cross so that their refusals read alike."""
    if causal:
        raise ValueError(f"{name}: causal=True is not supported: {queries} attend over all {keys} (non-causal "
                         f"cross attention, pattern NC)")
    T, S = query.shape[-3], key.shape[-3]
    if T == S:
        raise ValueError(f"{name}: query length T={T} equals key length S={S}: this entry is {queries} attending "
                         f"over {keys} (cross attention only); for self attention {self_attention_hint}")
