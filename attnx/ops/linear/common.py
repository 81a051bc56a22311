"""Pieces shared by the feature-map linear attentions (Based, Performer, cosFormer): option checks, and the sums
sum_j phi(q_t).phi(k_j) v_j and sum_j phi(q_t).phi(k_j) in their three forms. Each mechanism divides them with its
own floor on the normaliser.

Shapes: phi_q [B, T, N, F], phi_k [B, S, K, F], v [B, S, K, V], kernel [B, K, G, T, S] (G = N / K);
results: numerator [B, T, N, V], denominator [B, T, N, 1], float32.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from attnx.ops.linear.chunked import lightning_chunked

HIGHEST = jax.lax.Precision.HIGHEST


def check_block_size(name: str, block_size) -> None:
    if not isinstance(block_size, int) or isinstance(block_size, bool) or block_size < 1:
        raise ValueError(f"{name}.block_size: expected an int >= 1, got {block_size!r}")


def resolve_implementation(name: str, implementation: str | None, allowed: tuple[str, ...]) -> str:
    """`implementation`, or the first of `allowed` (the fast form) when None; anything else is an error."""
    implementation = implementation or allowed[0]
    if implementation not in allowed:
        raise ValueError(f"{name}.implementation: {implementation!r}; allowed: {allowed} or None")
    return implementation


def kernel_sums(kernel: jax.Array, v: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The quadratic form: sums of an explicit kernel [B, K, G, T, S] (already masked where needed)."""
    B, K, G, T, _ = kernel.shape
    numerator = jnp.einsum("bkgts,bskv->btkgv", kernel, v.astype(jnp.float32), precision=HIGHEST)
    denominator = jnp.einsum("bkgts->btkg", kernel)
    return numerator.reshape(B, T, K * G, -1), denominator.reshape(B, T, K * G, 1)


def feature_sums(phi_q: jax.Array, phi_k: jax.Array, v: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The non-causal linear form: one state sum_j phi(k_j) v_j^T and one normaliser sum_j phi(k_j) per kv head."""
    B, T, N, F = phi_q.shape
    K = phi_k.shape[2]
    state = jnp.einsum("bskf,bskv->bkfv", phi_k, v.astype(jnp.float32))
    normaliser = jnp.sum(phi_k, axis=1)  # [B, K, F]
    phi_q = phi_q.reshape(B, T, K, N // K, F)
    numerator = jnp.einsum("btkgf,bkfv->btkgv", phi_q, state)
    denominator = jnp.einsum("btkgf,bkf->btkg", phi_q, normaliser)
    return numerator.reshape(B, T, N, -1), denominator.reshape(B, T, N, 1)


def causal_feature_sums(phi_q: jax.Array, phi_k: jax.Array, v: jax.Array, block_size: int
                        ) -> tuple[jax.Array, jax.Array]:
    """The causal linear form (prefix sums over j <= t): Lightning's tiled scan with no decay, the normaliser
    carried as one extra value column of ones (spec llm_mechanisms.md §7 (d))."""
    V = v.shape[-1]
    ones = jnp.ones((*v.shape[:-1], 1), jnp.float32)
    both = lightning_chunked(phi_q, phi_k, jnp.concatenate([v.astype(jnp.float32), ones], -1),
                             jnp.zeros((phi_q.shape[2],), jnp.float32), block_size)
    return both[..., :V], both[..., V:]
