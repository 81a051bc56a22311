"""Pieces shared by every softmax-attention implementation: logit modifiers and mask evaluation on a block.

Internal layout of logits is grouped: [B, K, G, tq, sk] (G = N // K), so GQA never repeats keys or values. The order
in which modifiers apply is part of the contract and is the same everywhere:

    logits = scale * q . k  (+ bias)  -> logits_soft_cap * tanh(logits / logits_soft_cap)  -> score_mod(...)
    then masked pairs are excluded; `sinks` add exp(sink[n]) to each row's softmax denominator.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from attnx.mask import Mask

F32 = jnp.float32


def varying_axes(x) -> frozenset:
    """The manual mesh axes x varies over inside a `shard_map` (`manual_axis_type.varying` in jax 0.10, `vma` in
    other versions); empty outside one."""
    aval = jax.typeof(x)
    manual = getattr(aval, "manual_axis_type", None)
    return frozenset(manual.varying) if manual is not None else frozenset(getattr(aval, "vma", ()))


def match_varying(x: jax.Array, *references) -> jax.Array:
    """x marked as varying over every mesh axis its references (arrays; anything else is ignored) vary over.
    Inside a `shard_map`, loop carries and cond branches must keep one type, and fresh constants (accumulators
    started at 0 / -inf) are device-invariant while what the loop adds to them varies: ring attention runs these
    kernels per device. Outside a shard_map this returns x unchanged."""
    axes = frozenset().union(*(varying_axes(r) for r in jax.tree.leaves(references) if isinstance(r, jax.Array)))
    return jax.lax.pcast(x, tuple(sorted(axes)), to="varying") if axes else x


def group_heads(x: jax.Array | None, K: int, G: int, head_axis: int = 1) -> jax.Array | None:
    """[B, N|1, ...] -> [B, K|1, G|1, ...] splitting the head axis into (K, G)."""
    if x is None:
        return None
    n = x.shape[head_axis]
    new = (K, G) if n == K * G else (1, 1)
    return x.reshape(x.shape[:head_axis] + new + x.shape[head_axis + 1:])


def head_index(K: int, G: int) -> jax.Array:
    """Query-head index n = k * G + g as a [1, K, G, 1, 1] array."""
    return (jnp.arange(K)[:, None] * G + jnp.arange(G)[None, :])[None, :, :, None, None]


def batch_index(B: int) -> jax.Array:
    return jnp.arange(B)[:, None, None, None, None]


def apply_logit_mods(s, bias_blk, cap, score_mod, score_consts, b_idx, n_idx, q_idx, kv_idx):
    """Add bias, soft-cap, then apply score_mod. `s` is float32 [B, K, G, tq, sk]; indices broadcast against it."""
    if bias_blk is not None:
        s = s + bias_blk.astype(F32)
    if cap is not None:
        s = cap * jnp.tanh(s / cap)
    if score_mod is not None:
        s = score_mod(s, b_idx, n_idx, q_idx, kv_idx, *score_consts).astype(F32)
    return s


def score_mod_in_kernel(score_mod, s, b, n, t, j, dsds, derivative: bool):
    """score_mod(s, b, n, t, j) applied to float32 kernel logits; with `derivative`, its elementwise derivative (a
    jvp with unit tangent, since the mod acts elementwise) multiplied into `dsds` (None means 1). Shared by the
    Pallas GPU and TPU kernels. Returns (s, dsds)."""
    mod = lambda x: score_mod(x, b, n, t, j).astype(jnp.float32)  # noqa: E731
    if not derivative:
        return mod(s), dsds
    s, dmod = jax.jvp(mod, (s,), (jnp.ones_like(s),))
    return s, dmod if dsds is None else dsds * dmod


def mask_block(mask: Mask, mask_mod, mask_consts, q_idx, kv_idx, K: int, G: int, B: int, T: int, S: int):
    """Allowed pairs on the block rows `q_idx` [tq, 1] x cols `kv_idx` [1, sk] (absolute indices, may exceed T/S
    for padding, which is always excluded). Returns bool broadcastable to [B, K, G, tq, sk], or None if nothing is
    masked at all."""
    m = None
    if not mask.is_empty:
        m = group_heads(mask.evaluate(jnp.minimum(q_idx, T - 1), jnp.minimum(kv_idx, S - 1)), K, G)
    if mask_mod is not None:
        mm = mask_mod(batch_index(B), head_index(K, G), q_idx, kv_idx,
                      *mask_consts)
        mm = jnp.asarray(mm, dtype=bool)
        m = mm if m is None else (m & mm)
    return m

