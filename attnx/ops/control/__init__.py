"""Diffusion attention control: cross-attention edits used by training-free text-to-image methods.

- structured.py: Structured Diffusion Guidance's several-key / several-value cross attention (Feng et al., 2023).
- region.py: PrimeComposer's region-constrained cross attention, subject-word logits masked outside the subject's
  foreground (Wang et al., 2024).
- isolation.py: IR-Diffusion's isolation block mask over subject ids and the reposition of reference features
  (arXiv 2411.19261).

`naive_attention` below is the shared oracle: explicit logits, mask, softmax and weighted sum in float32 with GQA,
written independently of attnx's softmax core so that the fast paths (which call the core) are checked against
something they do not share.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

HIGHEST = jax.lax.Precision.HIGHEST


def naive_attention(query, key, value, allowed=None):
    """softmax(q k^T / sqrt(H) masked by `allowed`) v for query [*B, T, N, H], key [*B, S, K, H], value
    [*B, S, K, V] (head n reads key head n // (N / K)); allowed: bool broadcastable to [*B, T, S] or None.
    Rows with no allowed key return 0 (as attnx's core does). Returns float32 [*B, T, N, V]."""
    N, K = query.shape[-2], key.shape[-2]
    G = N // K
    q = query.astype(jnp.float32)
    k = jnp.repeat(key.astype(jnp.float32), G, axis=-2)
    v = jnp.repeat(value.astype(jnp.float32), G, axis=-2)
    logits = jnp.einsum("...tnh,...snh->...nts", q, k, precision=HIGHEST) / jnp.sqrt(jnp.float32(q.shape[-1]))
    if allowed is None:
        probs = jax.nn.softmax(logits, axis=-1)
    else:
        allowed = jnp.asarray(allowed)[..., None, :, :]  # insert the head axis: [*B, 1, T, S]
        # masked logits become 0 before exp and their weights 0 after it (no inf, so no NaN gradients)
        logits = jnp.where(allowed, logits, 0.0)
        peak = jnp.max(jnp.where(allowed, logits, -jnp.finfo(jnp.float32).max), axis=-1, keepdims=True)
        e = jnp.where(allowed, jnp.exp(logits - jax.lax.stop_gradient(peak)), 0.0)
        denom = jnp.sum(e, axis=-1, keepdims=True)
        probs = e / jnp.where(denom > 0, denom, 1.0)
    return jnp.einsum("...nts,...snv->...tnv", probs, v, precision=HIGHEST)
