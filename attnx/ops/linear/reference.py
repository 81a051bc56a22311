"""Quadratic oracle of decayed causal linear attention (the executable spec of Lightning Attention-2).

    o_t = sum_{j <= t} lambda^(t - j) (q_t . k_j) v_j,   lambda = exp(-s) per query head,

i.e. O = (Q K^T ⊙ M) V with M_tj = lambda^(t-j) for j <= t, no softmax, no normaliser (Qin et al., 2024, "Various
Lengths, Constant Speed: Efficient Language Modeling with Lightning Attention", arXiv 2405.17381, §3.1; the repo's
`ops/torch/linear_attention.py`). Computed in float32 at the highest matmul precision.

Shapes are canonical (after validation): q [B, T, N, H], k [B, S, K, H], v [B, S, K, V], slopes [N].
"""

import jax
import jax.numpy as jnp


def decayed_linear_attention(q, k, v, slopes, q_positions, k_positions, causal: bool = True):
    """sum_j [k_pos_j <= q_pos_t] exp(-s (q_pos_t - k_pos_j)) (q_t . k_j) v_j, for arbitrary absolute positions
    (the full sequence, or queries decoding against a cache whose slot j holds position j). Non-causal: every j,
    weighted exp(-s |q_pos_t - k_pos_j|)."""
    B, T, N, H = q.shape
    K = k.shape[2]
    G = N // K
    hi = jax.lax.Precision.HIGHEST
    qg = q.astype(jnp.float32).reshape(B, T, K, G, H)
    scores = jnp.einsum("btkgh,bskh->bkgts", qg, k.astype(jnp.float32), precision=hi)
    distance = (q_positions[:, None] - k_positions[None, :]).astype(jnp.float32)  # [T, S]
    s = slopes.astype(jnp.float32).reshape(K, G, 1, 1)
    if causal:
        decay = jnp.where(distance >= 0, jnp.exp(-s * jnp.maximum(distance, 0.0)), 0.0)  # [K, G, T, S]
    else:
        decay = jnp.exp(-s * jnp.abs(distance))
    out = jnp.einsum("bkgts,bskv->btkgv", scores * decay, v.astype(jnp.float32), precision=hi)
    return out.reshape(B, T, N, v.shape[-1])


def lightning_reference(q, k, v, slopes, causal: bool = True):
    positions = jnp.arange(q.shape[1])
    return decayed_linear_attention(q, k, v, slopes, positions, positions, causal)
