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

from attnx.ops.linear.common import (causal_feature_sums, check_block_size, feature_sums, kernel_sums,
                                     resolve_implementation)
from attnx.ops.linear.pallas_gpu import run_scan, scan_config
from attnx.validation import canonicalize

EPS = 1e-12
IMPLEMENTATIONS = ("chunked", "reference", "pallas_gpu", "pallas_tpu")


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


def _normalised(sums: tuple[jax.Array, jax.Array]) -> jax.Array:
    numerator, denominator = sums
    return numerator / (denominator + EPS)


def based_reference(q, k, v, causal: bool):
    positions_q, positions_k = jnp.arange(q.shape[1]), jnp.arange(k.shape[1])
    return _normalised(kernel_sums(_kernel(q, k, positions_q, positions_k, causal), v))


def based_chunked(q, k, v, causal: bool, block_size: int):
    phi_q, phi_k = taylor_feature_map(q), taylor_feature_map(k)
    if causal:
        return _normalised(causal_feature_sums(phi_q, phi_k, v, block_size))
    return _normalised(feature_sums(phi_q, phi_k, v))


def based_pallas(q, k, v, config):
    """Causal Based through the Lightning Attention-2 Pallas kernel (no decay): the Taylor features of q and k are
    its queries and keys, and the normaliser is one extra value column of ones (spec llm_mechanisms.md §7 (d))."""
    V = v.shape[-1]
    ones = jnp.ones((*v.shape[:-1], 1), jnp.float32)
    both = run_scan(taylor_feature_map(q), taylor_feature_map(k), jnp.concatenate([v.astype(jnp.float32), ones], -1),
                    None, config)
    return _normalised((both[..., :V], both[..., V:]))


def based_attention(query, key, value, *, causal: bool = False, block_size: int = 64,
                    implementation=None):
    """query [*B, T, N, H], key [*B, S, K, H], value [*B, S, K, V] -> [*B, T, N, V]; K divides N.

    causal=True needs S == T. implementation: "chunked" (default; linear in T), "reference" (quadratic), or
    "pallas_gpu" / "pallas_tpu" or their configs (causal only: the Lightning Attention-2 Pallas scan over the
    features).
    """
    args = canonicalize(query, key, value)
    T, S = args.q.shape[1], args.k.shape[1]
    if causal and S != T:
        raise ValueError(f"based: causal attention needs self attention (pattern CS), got query length {T} and "
                         f"key length {S}; cross attention is supported with causal=False (pattern NC)")
    check_block_size("based", block_size)
    config = scan_config("based", implementation, block_size)
    implementation = resolve_implementation("based", config.name if config else implementation, IMPLEMENTATIONS)
    if implementation == "reference":
        out = based_reference(args.q, args.k, args.v, causal)
    elif config is not None:
        if not causal:
            raise NotImplementedError(f"based: implementation {config.name!r} is the causal scan; the non-causal "
                                      "form is two einsums with no scan (implementation 'chunked')")
        out = based_pallas(args.q, args.k, args.v, config)
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
    return _normalised(kernel_sums(kernel, value_cache)).astype(query.dtype)
