"""ProbSparse self-attention of Informer (Zhou et al., 2021, "Informer: Beyond Efficient Transformer for Long
Sequence Time-Series Forecasting", arXiv 2012.07436, §3.1 eq. (4) and Lemma 1), as benchmarked in CAB
(`efficient_attention/modules/probsparse.py`, pattern NS, factor c = 5).

    U = c ceil(ln S) sampled keys per query, u = c ceil(ln T) active queries (each capped at the length)
    M(q_t) = max_{j in sample_t} q_t . k_j - (1 / S) sum_{j in sample_t} q_t . k_j     (the sparsity measure)
    top-u queries by M: o_t = softmax(q_t K^T / sqrt(H)) V;   every other query: o_t = mean_s v_s

Faithful to the code: the sampled indices are drawn with replacement, one set per query shared by every batch
element and head; the measure divides the sampled sum by S (the code's `Q_K_sample.sum(-1) / L_K`, not by U); the
measure is taken on unscaled scores (ordering is unchanged by a positive scale). With u >= T every query is active
and the result is exact softmax attention. Self attention only (CAB asserts no causal and no cross use).

Randomness: the key sample comes from `rng` when given, else from the fixed `seed` (default 0), so the default is
deterministic and reproducible; the code draws it from torch's global generator on every call. Gradients flow
through the active queries' softmax and the mean; the top-u choice itself is piecewise constant.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from attnx.ops.efficient.common import HIGHEST, group
from attnx.ops.efficient.sampling import sampled_self_attention_setup

IMPLEMENTATIONS = ("sparse", "reference")


def sample_sizes(T: int, S: int, factor: int) -> tuple[int, int]:
    """(U sampled keys per query, u active queries), as the code computes them."""
    sampled = min(factor * math.ceil(math.log(S)), S)
    active = min(factor * math.ceil(math.log(T)), T)
    return sampled, active


def probsparse_attention(query, key, value, *, causal: bool = False, factor: int = 5, rng=None, seed: int = 0,
                         implementation: str | None = None):
    """query [*B, T, N, H], key [*B, T, K, H], value [*B, T, K, V] -> [*B, T, N, V] (non-causal self only)."""
    args, (B, T, N, H, S, K), implementation = sampled_self_attention_setup(
        "probsparse", query, key, value, causal=causal, option="factor", option_value=factor,
        implementation=implementation, implementations=IMPLEMENTATIONS)
    sampled, active = sample_sizes(T, S, factor)
    rng = jax.random.key(seed) if rng is None else rng
    index = jax.random.randint(rng, (T, sampled), 0, S)  # [T, U], with replacement, as torch.randint
    q = group(args.q.astype(jnp.float32), K)  # [B, T, K, G, H]
    k, v = args.k.astype(jnp.float32), args.v.astype(jnp.float32)
    mean_v = jnp.mean(v, axis=1)  # [B, K, V]
    if implementation == "reference":  # dense: every score, the sample as a count matrix, every row's softmax
        scores = jnp.einsum("btkgh,bskh->bkgts", q, k, precision=HIGHEST)
        counts = jnp.zeros((T, S), jnp.float32).at[jnp.arange(T)[:, None], index].add(1.0)
        measure = (jnp.max(jnp.where(counts > 0, scores, -jnp.inf), axis=-1)
                   - jnp.sum(counts * scores, axis=-1) / S)  # [B, K, G, T]
        top = jax.lax.top_k(measure, active)[1]
        chosen = jnp.any(top[..., :, None] == jnp.arange(T), axis=-2)  # [B, K, G, T]
        full = jnp.einsum("bkgts,bskv->bkgtv", jax.nn.softmax(scores * H ** -0.5, -1), v, precision=HIGHEST)
        out = jnp.where(chosen[..., None], full, mean_v[:, :, None, None, :])  # [B, K, G, T, V]
        out = jnp.transpose(out, (0, 3, 1, 2, 4))
    else:
        k_sample = k[:, index]  # [B, T, U, K, H]: O(T U H), as the code's K_sample
        sample_scores = jnp.einsum("btkgh,btukh->bkgtu", q, k_sample, precision=HIGHEST)
        measure = jnp.max(sample_scores, -1) - jnp.sum(sample_scores, -1) / S  # [B, K, G, T]
        top = jax.lax.top_k(measure, active)[1]  # [B, K, G, u]
        q_top = jnp.take_along_axis(jnp.transpose(q, (0, 2, 3, 1, 4)), top[..., None], axis=3)  # [B, K, G, u, H]
        scores = jnp.einsum("bkguh,bskh->bkgus", q_top, k, precision=HIGHEST) * H ** -0.5
        rows = jnp.einsum("bkgus,bskv->bkguv", jax.nn.softmax(scores, -1), v, precision=HIGHEST)
        # Scatter the u active rows over the lazy mean(V) rows: a one-hot [u, T] map keeps it a plain einsum.
        onehot = jax.nn.one_hot(top, T, dtype=jnp.float32)  # [B, K, G, u, T]
        base = mean_v[:, :, None, None, :]
        out = base + jnp.einsum("bkgut,bkguv->bkgtv", onehot, rows - base, precision=HIGHEST)
        out = jnp.transpose(out, (0, 3, 1, 2, 4))
    out = out.reshape(B, T, N, -1).astype(args.q.dtype)
    return out.reshape(args.batch_shape + out.shape[1:])


def probsparse_reference(query, key, value, **kwargs):
    return probsparse_attention(query, key, value, implementation="reference", **kwargs)
