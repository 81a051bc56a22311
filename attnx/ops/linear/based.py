"""Based: linear attention with the 2nd-order Taylor feature map (Arora et al., 2024, "Simple linear attention
language models balance the recall-throughput tradeoff", arXiv 2402.18668, §3; Zoology, Arora et al., 2023,
arXiv 2312.04927). Official code: HazyResearch/zoology `mixers/based.py`, `mixers/feature_maps/taylor.py`.

    phi(x) = [1, x / d^(1/4), vec(x x^T) / (sqrt(2) sqrt(d))]        (1 + d + d^2 features, d = head dim)
    phi(q) . phi(k) = 1 + (q.k) / sqrt(d) + (q.k)^2 / (2 d)             (the Taylor expansion of exp(q.k / sqrt d))
    y_t = sum_{j<=t} phi(q_t).phi(k_j) v_j / (sum_{j<=t} phi(q_t).phi(k_j) + 1e-12)

The kernel value is >= 1/2 for every q, k, so the denominator never vanishes. The Based paper projects q and k to a
small feature dimension (16 in its LMs) so that d^2 stays small; here d is the head dim of the `query`/`key` given.
The causal form reuses Lightning's tiled scan with no decay (spec §7 (d)): the denominator is one extra value
column of ones. The exact sliding-window part of the Based architecture is the `sliding_window` mechanism, used in
other layers of the hybrid model.

Patterns: NS, CS, NC (causal cross attention has no agreed alignment here and is refused).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from attnx.ops.linear.chunked import lightning_chunked
from attnx.validation import canonicalize

EPS = 1e-12
IMPLEMENTATIONS = ("chunked", "reference")


def taylor_feature_map(x: jax.Array) -> jax.Array:
    """[..., d] -> [..., 1 + d + d^2], in float32."""
    x = x.astype(jnp.float32)
    d = x.shape[-1]
    outer = (x[..., :, None] * x[..., None, :]).reshape(*x.shape[:-1], d * d)
    ones = jnp.ones((*x.shape[:-1], 1), jnp.float32)
    return jnp.concatenate([ones, x / d**0.25, outer / (2**0.5 * d**0.5)], axis=-1)


def _kernel(q, k, q_positions=None, k_positions=None, causal=False):
    """[B, K, G, T, S] of phi(q).phi(k) through the closed form, with the causal mask applied."""
    B, T, N, H = q.shape
    K = k.shape[2]
    qg = q.astype(jnp.float32).reshape(B, T, K, N // K, H)
    dots = jnp.einsum("btkgh,bskh->bkgts", qg, k.astype(jnp.float32), precision=jax.lax.Precision.HIGHEST)
    kernel = 1.0 + dots / H**0.5 + jnp.square(dots) / (2.0 * H)
    if causal:
        kernel = jnp.where(k_positions[None, :] <= q_positions[:, None], kernel, 0.0)
    return kernel


def _normalised(kernel, v, out_shape):
    numerator = jnp.einsum("bkgts,bskv->btkgv", kernel, v.astype(jnp.float32), precision=jax.lax.Precision.HIGHEST)
    denominator = jnp.einsum("bkgts->btkg", kernel)[..., None]
    return (numerator / (denominator + EPS)).reshape(out_shape)


def based_reference(q, k, v, causal: bool):
    positions_q, positions_k = jnp.arange(q.shape[1]), jnp.arange(k.shape[1])
    kernel = _kernel(q, k, positions_q, positions_k, causal)
    return _normalised(kernel, v, (*q.shape[:3], v.shape[-1]))


def based_chunked(q, k, v, causal: bool, block_size: int):
    B, T, N, H = q.shape
    K, V = k.shape[2], v.shape[-1]
    phi_q, phi_k = taylor_feature_map(q), taylor_feature_map(k)
    if causal:
        ones = jnp.ones((*v.shape[:-1], 1), jnp.float32)
        both = lightning_chunked(phi_q, phi_k, jnp.concatenate([v.astype(jnp.float32), ones], -1),
                                 jnp.zeros((N,), jnp.float32), block_size)
        return both[..., :V] / (both[..., V:] + EPS)
    # Non-causal: one state sum_j phi(k_j) v_j^T and one normaliser sum_j phi(k_j) per kv head.
    state = jnp.einsum("bskf,bskv->bkfv", phi_k, v.astype(jnp.float32))
    normaliser = jnp.sum(phi_k, axis=1)  # [B, K, F]
    phi_q = phi_q.reshape(B, T, K, N // K, -1)
    numerator = jnp.einsum("btkgf,bkfv->btkgv", phi_q, state)
    denominator = jnp.einsum("btkgf,bkf->btkg", phi_q, normaliser)[..., None]
    return (numerator / (denominator + EPS)).reshape(B, T, N, V)


def based_attention(query, key, value, *, causal: bool = False, block_size: int = 64,
                    implementation: str | None = None):
    """query [*B, T, N, H], key [*B, S, K, H], value [*B, S, K, V] -> [*B, T, N, V]; K divides N.

    causal=True needs S == T. implementation: "chunked" (default; linear in T) or "reference" (quadratic).
    """
    args = canonicalize(query, key, value)
    T, S = args.q.shape[1], args.k.shape[1]
    if causal and S != T:
        raise ValueError(f"based: causal attention needs self attention (pattern CS), got query length {T} and "
                         f"key length {S}; cross attention is supported with causal=False (pattern NC)")
    if not isinstance(block_size, int) or isinstance(block_size, bool) or block_size < 1:
        raise ValueError(f"based.block_size: expected an int >= 1, got {block_size!r}")
    implementation = implementation or "chunked"
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"based.implementation: {implementation!r}; allowed: {IMPLEMENTATIONS} or None")
    if implementation == "reference":
        out = based_reference(args.q, args.k, args.v, causal)
    else:
        out = based_chunked(args.q, args.k, args.v, causal, block_size)
    out = out.astype(args.q.dtype)
    return out.reshape(args.batch_shape + out.shape[1:])


def based_reference_fn(query, key, value, *, causal: bool = False, block_size: int = 64):
    return based_attention(query, key, value, causal=causal, block_size=block_size, implementation="reference")


def based_decode(query, key_cache, value_cache, *, query_positions, block_size: int = 64):
    """The registry decode rule: causal Based attention of queries at `query_positions` over a KV cache."""
    del block_size
    kernel = _kernel(query, key_cache, jnp.asarray(query_positions), jnp.arange(key_cache.shape[1]), causal=True)
    out = _normalised(kernel, value_cache, (*query.shape[:3], value_cache.shape[-1]))
    return out.astype(query.dtype)
