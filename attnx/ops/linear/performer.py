"""Performer / FAVOR+: softmax attention approximated with positive orthogonal random features (Choromanski et al.,
2021, "Rethinking Attention with Performers", arXiv 2009.14794, §2.3 positive random features, §2.4 orthogonal
features and the unidirectional (causal) prefix-sum form). As benchmarked in CAB (`efficient_attention/modules/
performer.py`, approx_attn_dim m = 16).

    x' = x / H^(1/4)                       (so that phi(q).phi(k) estimates exp(q.k / sqrt H))
    phi(x) = exp(w x' - |x'|^2 / 2 - c) / sqrt(m),   w: [m, H] orthogonal Gaussian rows with chi-distributed norms
    O = phi(Q) (phi(K)^T V) / phi(Q) (phi(K)^T 1)          non-causal
    o_t = phi(q_t) sum_{j<=t} phi(k_j) v_j^T / phi(q_t) sum_{j<=t} phi(k_j)     causal, as prefix sums

The stabiliser c (a query's own max, and the max over all keys) cancels between numerator and denominator, so it
changes rounding only. CAB disables its causal-self Performer because its implementation leaks; the prefix-sum form
here is causal (the CAB causality test checks it), so attnx declares NS, CS and NC.

`features` is an explicit weight [m, H]; None draws the orthogonal features from `seed` (fixed, reproducible).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from attnx.ops.linear.common import (HIGHEST, causal_feature_sums, check_block_size, feature_sums, kernel_sums,
                                     resolve_implementation)
from attnx.validation import canonicalize

IMPLEMENTATIONS = ("chunked", "reference")


def orthogonal_features(rng: jax.Array, num_features: int, head_dim: int) -> jax.Array:
    """[m, H]: stacked blocks of H orthogonal directions (QR of a Gaussian matrix), each row rescaled to the norm of
    an H-dimensional Gaussian vector, so rows are marginally Gaussian but orthogonal within a block (§2.4).

    Q's columns are multiplied by the signs of R's diagonal: without that, LAPACK's sign convention makes Q
    non-uniform over the orthogonal group and the kernel estimate biased (measured: the error stopped falling at
    ~8% of the output scale however many features)."""
    blocks = []
    keys = jax.random.split(rng, -(-num_features // head_dim) + 1)
    for key in keys[:-1]:
        q, r = jnp.linalg.qr(jax.random.normal(key, (head_dim, head_dim)))
        blocks.append((q * jnp.sign(jnp.diagonal(r))).T)
    directions = jnp.concatenate(blocks, axis=0)[:num_features]
    norms = jnp.linalg.norm(jax.random.normal(keys[-1], (num_features, head_dim)), axis=1, keepdims=True)
    return directions * norms


def _feature_map(x, features, is_query: bool):
    """Positive random features of x [B, L, heads, H] -> [B, L, heads, m], float32."""
    x = x.astype(jnp.float32) * x.shape[-1] ** -0.25
    projected = jnp.einsum("blnh,mh->blnm", x, features.astype(jnp.float32))
    squared = 0.5 * jnp.sum(jnp.square(x), axis=-1, keepdims=True)
    if is_query:  # per-row stabiliser: cancels in each query's ratio
        stabiliser = jnp.max(projected, axis=-1, keepdims=True)
    else:  # one stabiliser for all keys of a head: a common factor of numerator and denominator
        stabiliser = jnp.max(projected, axis=(1, 3), keepdims=True)
    stabiliser = jax.lax.stop_gradient(stabiliser)
    return jnp.exp(projected - squared - stabiliser) / features.shape[0] ** 0.5


def _features_or_default(features, num_features: int, head_dim: int, seed: int):
    if features is None:
        return orthogonal_features(jax.random.key(seed), num_features, head_dim)
    if features.ndim != 2 or features.shape[1] != head_dim:
        raise ValueError(f"performer.features: expected [m, H] with H = {head_dim}, got {features.shape}")
    return features


def _masked_kernel(phi_q, phi_k, visible):
    """phi(q).phi(k) as an explicit [B, K, G, T, S] kernel, zero where `visible` [T, S] (if given) is False."""
    B, T, N, F = phi_q.shape
    K = phi_k.shape[2]
    kernel = jnp.einsum("btkgm,bskm->bkgts", phi_q.reshape(B, T, K, N // K, F), phi_k, precision=HIGHEST)
    return kernel if visible is None else jnp.where(visible, kernel, 0.0)


def _normalised(sums: tuple[jax.Array, jax.Array]) -> jax.Array:
    numerator, denominator = sums  # positive features: the normaliser is > 0, no floor needed
    return numerator / denominator


def performer_attention(query, key, value, *, causal: bool = False, features=None, num_features: int = 16,
                        seed: int = 0, block_size: int = 64, implementation: str | None = None):
    """query [*B, T, N, H], key [*B, S, K, H], value [*B, S, K, V] -> [*B, T, N, V]. causal=True needs S == T."""
    args = canonicalize(query, key, value)
    B, T, N, H = args.q.shape
    S = args.k.shape[1]
    if causal and S != T:
        raise ValueError(f"performer: causal attention needs self attention (pattern CS), got query length {T} "
                         f"and key length {S}")
    if not isinstance(num_features, int) or num_features < 1:
        raise ValueError(f"performer.num_features: expected an int >= 1, got {num_features!r}")
    check_block_size("performer", block_size)
    implementation = resolve_implementation("performer", implementation, IMPLEMENTATIONS)
    w = _features_or_default(features, num_features, H, seed)
    phi_q = _feature_map(args.q, w, is_query=True)  # [B, T, N, m]
    phi_k = _feature_map(args.k, w, is_query=False)  # [B, S, K, m]
    if implementation == "reference":
        visible = jnp.tril(jnp.ones((T, S), bool)) if causal else None
        sums = kernel_sums(_masked_kernel(phi_q, phi_k, visible), args.v)
    elif causal:
        sums = causal_feature_sums(phi_q, phi_k, args.v, block_size)
    else:
        sums = feature_sums(phi_q, phi_k, args.v)
    out = _normalised(sums).astype(args.q.dtype)
    return out.reshape(args.batch_shape + out.shape[1:])


def performer_reference(query, key, value, **kwargs):
    return performer_attention(query, key, value, implementation="reference", **kwargs)


def performer_decode(query, key_cache, value_cache, *, query_positions, features=None, num_features: int = 16,
                     seed: int = 0, block_size: int = 64):
    """The registry decode rule: causal FAVOR+ of queries at `query_positions` over a KV cache. The keys'
    stabiliser is the max over cache slots up to the last query, so it matches the full-sequence call's up to
    rounding (it cancels anyway)."""
    del block_size
    w = _features_or_default(features, num_features, query.shape[-1], seed)
    positions = jnp.asarray(query_positions)
    visible = jnp.arange(key_cache.shape[1])[None, :] <= positions[:, None]  # [T, L]
    phi_q = _feature_map(query, w, is_query=True)
    phi_k = _feature_map(jnp.where(visible[-1][None, :, None, None], key_cache, 0.0), w, is_query=False)
    return _normalised(kernel_sums(_masked_kernel(phi_q, phi_k, visible), value_cache)).astype(query.dtype)
