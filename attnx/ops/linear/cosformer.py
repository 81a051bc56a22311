"""cosFormer: linear attention with a cos-based re-weighting (Qin et al., 2022, "cosFormer: Rethinking Softmax in
Attention", arXiv 2202.08791, §3.2-3.3), as benchmarked in CAB (`efficient_attention/modules/cosformer.py`).

    s(i, j) = ReLU(q_i) . ReLU(k_j) cos(pi (i - j) / (2 M)),   M = max(T, S)
    o_i = sum_j s(i, j) v_j / max(sum_j s(i, j), eps)

cos(a - b) = cos a cos b + sin a sin b, so the weight splits into [cos, sin]-modulated copies of the ReLU features and
the sums factor through two [H, V] states: linear in T. Non-causal only (patterns NS and NC, as CAB declares): M
depends on the whole sequence length, so a prefix sees different weights and the causal-prefix property cannot
hold.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from attnx.ops.linear.common import HIGHEST, feature_sums, kernel_sums, resolve_implementation
from attnx.validation import canonicalize

EPS = 1e-6  # the official code's floor on the normaliser (ReLU features can make it 0)
IMPLEMENTATIONS = ("linear", "reference")


def _angles(length: int, period: int) -> jax.Array:
    return math.pi / 2 * jnp.arange(length, dtype=jnp.float32) / period


def cosformer_attention(query, key, value, *, causal: bool = False, implementation: str | None = None):
    """query [*B, T, N, H], key [*B, S, K, H], value [*B, S, K, V] -> [*B, T, N, V]; non-causal only."""
    if causal:
        raise ValueError("cosformer: non-causal attention only (patterns NS, NC): its re-weighting depends on the "
                         "full length M = max(T, S). Use causal=False, or a causal mechanism such as 'lightning'")
    args = canonicalize(query, key, value)
    implementation = resolve_implementation("cosformer", implementation, IMPLEMENTATIONS)
    B, T, N, H = args.q.shape
    S, K = args.k.shape[1], args.k.shape[2]
    q = jax.nn.relu(args.q.astype(jnp.float32))
    k = jax.nn.relu(args.k.astype(jnp.float32))
    qa, ka = _angles(T, max(T, S)), _angles(S, max(T, S))
    if implementation == "reference":
        scores = jnp.einsum("btkgh,bskh->bkgts", q.reshape(B, T, K, N // K, H), k, precision=HIGHEST)
        numerator, denominator = kernel_sums(scores * jnp.cos(qa[:, None] - ka[None, :]), args.v)
    else:
        numerator, denominator = 0.0, 0.0
        for fn in (jnp.cos, jnp.sin):  # cos(a - b) = cos a cos b + sin a sin b
            part = feature_sums(q * fn(qa)[None, :, None, None], k * fn(ka)[None, :, None, None], args.v)
            numerator, denominator = numerator + part[0], denominator + part[1]
    out = (numerator / jnp.maximum(denominator, EPS)).astype(args.q.dtype)
    return out.reshape(args.batch_shape + out.shape[1:])


def cosformer_reference(query, key, value, **kwargs):
    return cosformer_attention(query, key, value, implementation="reference", **kwargs)
