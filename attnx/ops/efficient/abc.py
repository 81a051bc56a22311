"""ABC: attention with bounded-memory control (Peng et al., 2022, "ABC: Attention with Bounded-memory Control",
arXiv 2110.02488, §3 eq. (6)-(8) and §3.3 causal form), as benchmarked in CAB (`efficient_attention/modules/abc.py`,
patterns NS, CS, NC, CC, n = 16 slots).

Keys and values are written into n memory slots with learned control weights phi_key [H, n], phi_value [V, n]
(the code's `compress_k`, `compress_v`, shared by all heads):

    alpha_s = k_s phi_key                     (slot logits of key s, [n])
    K~_r = sum_s softmax_s(alpha)_{s r} k_s   (the same for V~ with v and phi_value)
    o_t = softmax_r(q_t . K~_r / sqrt(H)) V~

Causal self attention (CS) writes only the prefix: the memory seen by query t is

    K~_{t, r} = sum_{m <= t} softmax_{m <= t}(alpha_{:, r})_m k_m

computed here as a blocked scan carrying (log-sum-exp, normalised sum) pairs (O(T n H), like the code's [T, n, H]
tensor). CAB's own causal non-incremental branch differs: it weights only the current key, exp(alpha_t -
logcumsumexp(alpha)_t) k_t, with no sum over m < t, so the memory forgets everything but the newest token (see the
CAB caveat in the spec); attnx implements the prefix form above and checks it with the CAB causality test.
Causal cross attention (CC, T != S) uses the full memory, as the code does (`if not causal or cross`): queries never
see each other, so each query's output does not depend on later queries.

Following the code, the slot logits come from the keys/values themselves (the paper's control vectors are
computed from the layer input); q is scaled by 1/sqrt(H). Weights: explicit `phi_key`/`phi_value`, or None to draw
the code's init (Xavier-uniform with gain 2^-1/2) from the fixed `seed`, so a call without weights is reproducible.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from attnx.ops.efficient.common import HIGHEST, check_int, decode_through_full_causal, group, resolve_implementation
from attnx.validation import canonicalize

IMPLEMENTATIONS = ("scan", "reference")
DEFAULT_SLOTS = 16


def slot_weights(rng: jax.Array, dim: int, num_slots: int, dtype=jnp.float32) -> jax.Array:
    """[dim, n] Xavier-uniform with gain 2^-1/2 (the code's `nn.init.xavier_uniform_(compress_k, gain=2 ** -.5)`)."""
    bound = 2 ** -0.5 * (6.0 / (dim + num_slots)) ** 0.5
    return jax.random.uniform(rng, (dim, num_slots), dtype, -bound, bound)


def _weights(phi_key, phi_value, num_slots, H: int, V: int, seed: int):
    given = [w for w in (phi_key, phi_value) if w is not None]
    if len(given) == 1:
        raise ValueError("abc: give both phi_key and phi_value, or neither (then they are drawn from seed)")
    if not given:
        n = DEFAULT_SLOTS if num_slots is None else num_slots
        check_int("abc.num_slots", n)
        rk, rv = jax.random.split(jax.random.key(seed))
        return slot_weights(rk, H, n), slot_weights(rv, V, n)
    phi_key, phi_value = jnp.asarray(phi_key), jnp.asarray(phi_value)
    n = phi_key.shape[-1]
    if phi_key.shape != (H, n) or phi_value.shape != (V, n):
        raise ValueError(f"abc.phi_key / abc.phi_value: expected [H, n] = [{H}, n] and [V, n] = [{V}, n] with the "
                         f"same n, got {phi_key.shape} and {phi_value.shape}")
    if num_slots is not None and num_slots != n:
        raise ValueError(f"abc.num_slots: {num_slots} disagrees with the weights' {n} slots")
    return phi_key.astype(jnp.float32), phi_value.astype(jnp.float32)


def _memory(x, phi):
    """Full memory: x [B, S, K, D], phi [D, n] -> [B, K, n, D] = softmax_s(x phi)^T x."""
    logits = jnp.einsum("bskd,dr->bksr", x, phi, precision=HIGHEST)
    return jnp.einsum("bksr,bskd->bkrd", jax.nn.softmax(logits, axis=2), x, precision=HIGHEST)


def _prefix_memory_scan(x, phi, block_size: int):
    """Causal memory: x [B, T, K, D] -> [B, T, K, n, D], row t the prefix-softmax-weighted sum over m <= t.

    Blocked scan: within a block a masked [b, b] softmax per slot, across blocks a carried (log-sum-exp of the
    weights so far, weighted mean so far) pair, merged as in online softmax, so no exp overflows or underflows and
    the memory is O(T n D), like the code's [T, n, D] tensor."""
    B, T, K, D = x.shape
    logits = jnp.einsum("btkd,dr->btkr", x, phi, precision=HIGHEST)
    nb = -(-T // block_size)
    pad = nb * block_size - T  # padded positions get -inf logits: zero weight, and their rows are dropped
    logits = jnp.pad(logits, ((0, 0), (0, pad), (0, 0), (0, 0)), constant_values=-jnp.inf)
    x = jnp.pad(x, ((0, 0), (0, pad), (0, 0), (0, 0)))
    blocks = lambda y: jnp.moveaxis(y.reshape(B, nb, block_size, *y.shape[2:]), 1, 0)
    visible = jnp.tril(jnp.ones((block_size, block_size), bool))

    def step(carry, block):
        lse_c, mean_c = carry  # [B, K, n], [B, K, n, D]
        a, xb = block  # [B, b, K, n], [B, b, K, D]
        masked = jnp.where(visible, jnp.moveaxis(a, 1, -1)[..., None, :], -jnp.inf)  # [B, K, n, b_t, b_m]
        lse_l = jax.nn.logsumexp(masked, axis=-1)  # [B, K, n, b_t]
        mean_l = jnp.einsum("bkrtm,bmkd->bkrtd", jax.nn.softmax(masked, axis=-1), xb, precision=HIGHEST)
        lse = jnp.logaddexp(lse_c[..., None], lse_l)
        mean = (jnp.exp(lse_c[..., None] - lse)[..., None] * mean_c[..., None, :]
                + jnp.exp(lse_l - lse)[..., None] * mean_l)  # [B, K, n, b_t, D]
        return (lse[..., -1], mean[..., -1, :]), jnp.moveaxis(mean, 3, 1)  # rows [B, b, K, n, D]

    n = phi.shape[1]
    init = (jnp.full((B, K, n), -jnp.inf), jnp.zeros((B, K, n, D)))
    _, rows = jax.lax.scan(step, init, (blocks(logits), blocks(x)))
    return jnp.moveaxis(rows, 0, 1).reshape(B, nb * block_size, K, n, D)[:, :T]


def _prefix_memory_dense(x, phi):
    """The same with an explicit [T, T] masked softmax per slot (the reference)."""
    T = x.shape[1]
    logits = jnp.einsum("bmkd,dr->bkrm", x, phi, precision=HIGHEST)[:, :, :, None, :]  # [B, K, n, 1, T]
    visible = jnp.tril(jnp.ones((T, T), bool))
    weights = jax.nn.softmax(jnp.where(visible, logits, -jnp.inf), axis=-1)  # [B, K, n, T, T]
    return jnp.einsum("bkrtm,bmkd->btkrd", weights, x, precision=HIGHEST)


def abc_attention(query, key, value, *, causal: bool = False, phi_key=None, phi_value=None,
                  num_slots: int | None = None, seed: int = 0, block_size: int = 64,
                  implementation: str | None = None):
    """query [*B, T, N, H], key [*B, S, K, H], value [*B, S, K, V] -> [*B, T, N, V]; all four CAB patterns.

    phi_key [H, n], phi_value [V, n]: the slot control weights (None: drawn from `seed`, n = num_slots or 16).
    block_size: the causal scan's block length (the memory is exact for any value)."""
    args = canonicalize(query, key, value)
    B, T, N, H = args.q.shape
    S, K, V = args.k.shape[1], args.k.shape[2], args.v.shape[3]
    implementation = resolve_implementation("abc", implementation, IMPLEMENTATIONS)
    check_int("abc.block_size", block_size)
    phi_k, phi_v = _weights(phi_key, phi_value, num_slots, H, V, seed)
    q = group(args.q.astype(jnp.float32) * H ** -0.5, K)
    k, v = args.k.astype(jnp.float32), args.v.astype(jnp.float32)
    if causal and T == S:  # CS: the memory of query t holds positions <= t only
        if implementation == "reference":
            k_mem, v_mem = _prefix_memory_dense(k, phi_k), _prefix_memory_dense(v, phi_v)  # [B, T, K, n, D]
        else:
            k_mem, v_mem = _prefix_memory_scan(k, phi_k, block_size), _prefix_memory_scan(v, phi_v, block_size)
        probs = jax.nn.softmax(jnp.einsum("btkgh,btkrh->btkgr", q, k_mem, precision=HIGHEST), axis=-1)
        out = jnp.einsum("btkgr,btkrv->btkgv", probs, v_mem, precision=HIGHEST)
    else:  # NS, NC, and CC (queries never interact, so the full memory is causal in the CAB sense)
        k_mem, v_mem = _memory(k, phi_k), _memory(v, phi_v)  # [B, K, n, D]
        probs = jax.nn.softmax(jnp.einsum("btkgh,bkrh->btkgr", q, k_mem, precision=HIGHEST), axis=-1)
        out = jnp.einsum("btkgr,bkrv->btkgv", probs, v_mem, precision=HIGHEST)
    out = out.reshape(B, T, N, V).astype(args.q.dtype)
    return out.reshape(args.batch_shape + out.shape[1:])


def abc_reference(query, key, value, **kwargs):
    return abc_attention(query, key, value, implementation="reference", **kwargs)


def abc_decode(query, key_cache, value_cache, *, query_positions, **kwargs):
    """The registry decode rule: queries at `query_positions` over a KV cache (slot j = position j), equal to the
    rows of the full causal call (the prefix memory of position t reads keys/values <= t only)."""
    return decode_through_full_causal(abc_attention, query, key_cache, value_cache, query_positions=query_positions,
                                      **kwargs)
