"""Performer / FAVOR+: softmax attention approximated with positive orthogonal random features (Choromanski et al.,
2021, "Rethinking Attention with Performers", arXiv 2009.14794, §2.3 positive random features, §2.4 orthogonal
features and the unidirectional (causal) prefix-sum form). As benchmarked in CAB (`efficient_attention/modules/
performer.py`, approx_attn_dim m = 16).

    x' = x / H^(1/4)                       (so that phi(q).phi(k) estimates exp(q.k / sqrt H))
    phi(x) = (exp(w x' - |x'|^2 / 2 - c) + eps) / sqrt(m),   w: [m, H] orthogonal Gaussian rows, chi-distributed norms
    O = phi(Q) (phi(K)^T V) / phi(Q) (phi(K)^T 1)          non-causal
    o_t = phi(q_t) sum_{j<=t} phi(k_j) v_j^T / phi(q_t) sum_{j<=t} phi(k_j)     causal, as prefix sums

Stabiliser c and eps follow the official code (google-research `performer/fast_attention/jax/fast_attention.py`,
`nonnegative_softmax_kernel_feature_creator`): c is the max of the projections w x' (without the -|x'|^2/2 term),
per row for a query and over all keys for keys, and eps = 1e-4 is added to every feature. Without eps a key of large
norm (or one far from every w) underflows to 0 in all features, and a causal row whose visible keys all underflow is
0/0: this is the NaN MQAR training hit (bench/RESULTS.md); the eps keeps the normaliser > 0.

Causal form, a deliberate departure: the official code's key stabiliser is one max over the whole sequence, which
(with eps, which does not cancel) lets a future key change an earlier row's output, and is what drove early rows to
underflow. Here row t uses the prefix max M_t = max_{j<=t} c_j of the keys it sees, i.e. its keys' features are
exp(w k'_j - |k'_j|^2/2 - M_t) + eps. For the last row (and every non-causal row) this is the official feature map;
earlier rows see exactly what they would see had the sequence ended there. The fast form carries the state stabilised
by the running max and rescales it by exp(M_old - M_new) when the max grows (the online-softmax trick); the eps part
(eps sum_m phi(q_t)_m sum_{j<=t} v_j) is a plain prefix sum. Queries keep the per-row max (a row's own factor).
The stabilisers carry no gradient (stop_gradient), as they would cancel without eps.

CAB disables its causal-self Performer because its implementation leaks; the prefix-sum form here is causal (the CAB
causality test checks it), so attnx declares NS, CS and NC.

`features` is an explicit weight [m, H]; None draws the orthogonal features from `seed` (fixed, reproducible).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from attnx.ops.linear.common import (HIGHEST, check_block_size, feature_sums, kernel_sums,
                                     resolve_implementation)
from attnx.validation import canonicalize

IMPLEMENTATIONS = ("chunked", "reference")
EPS = 1e-4  # the official JAX code's default `eps` of the softmax-kernel features


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


def _exponents(x, features):
    """x [B, L, heads, H] -> (w x' - |x'|^2 / 2, max_m w x' with no gradient), float32, [B, L, heads, m] and
    [B, L, heads, 1]."""
    x = x.astype(jnp.float32) * x.shape[-1] ** -0.25
    projected = jnp.einsum("blnh,mh->blnm", x, features.astype(jnp.float32), precision=HIGHEST)
    squared = 0.5 * jnp.sum(jnp.square(x), axis=-1, keepdims=True)
    return projected - squared, jax.lax.stop_gradient(jnp.max(projected, axis=-1, keepdims=True))


def _query_features(q, features):
    exponent, row_max = _exponents(q, features)  # the per-row stabiliser is a factor of the row's own ratio
    return (jnp.exp(exponent - row_max) + EPS) / features.shape[0] ** 0.5


def _key_features(k, features):
    """Non-causal keys: one stabiliser per (batch, kv head), the max over all its keys and features."""
    exponent, row_max = _exponents(k, features)
    return (jnp.exp(exponent - jnp.max(row_max, axis=1, keepdims=True)) + EPS) / features.shape[0] ** 0.5


def _unit_keys(k, features):
    """Causal keys: exp(exponent - c_j) / sqrt(m) with each key's own max c_j [B, S, K] (the row's stabiliser M_t is
    applied later as the factor exp(c_j - M_t) <= 1, so nothing here can overflow)."""
    exponent, row_max = _exponents(k, features)
    return jnp.exp(exponent - row_max) / features.shape[0] ** 0.5, row_max[..., 0]


def _features_or_default(features, num_features: int, head_dim: int, seed: int):
    if features is None:
        return orthogonal_features(jax.random.key(seed), num_features, head_dim)
    if features.ndim != 2 or features.shape[1] != head_dim:
        raise ValueError(f"performer.features: expected [m, H] with H = {head_dim}, got {features.shape}")
    return features


def _masked_kernel(phi_q, phi_k, visible):
    """phi(q).phi(k) as an explicit [B, K, G, T, S] kernel (non-causal: no mask)."""
    B, T, N, F = phi_q.shape
    K = phi_k.shape[2]
    kernel = jnp.einsum("btkgm,bskm->bkgts", phi_q.reshape(B, T, K, N // K, F), phi_k, precision=HIGHEST)
    return kernel if visible is None else jnp.where(visible, kernel, 0.0)


def _causal_kernel(phi_q, unit_k, key_max, visible):
    """The quadratic causal kernel [B, K, G, T, S] with the per-row key stabiliser M_t = max of key_max [B, S, K]
    over the keys row t sees (`visible` [T, S]): phi(q_t).(unit_k_j exp(c_j - M_t) + eps / sqrt(m))."""
    B, T, N, F = phi_q.shape
    K = unit_k.shape[2]
    seen = jnp.where(visible[None, :, :, None], key_max[:, None], -jnp.inf)  # [B, T, S, K]
    row_max = jnp.max(seen, axis=2)  # [B, T, K]
    shift = jnp.exp(seen - row_max[:, :, None]).transpose(0, 3, 1, 2)[:, :, None]  # [B, K, 1, T, S], 0 if unseen
    q = phi_q.reshape(B, T, K, N // K, F)
    kernel = jnp.einsum("btkgm,bskm->bkgts", q, unit_k, precision=HIGHEST) * shift
    eps_term = (EPS / F ** 0.5) * jnp.sum(q, axis=-1).transpose(0, 2, 3, 1)[..., None]  # [B, K, G, T, 1]
    return kernel + jnp.where(visible, eps_term, 0.0)


def _causal_sums(phi_q, unit_k, key_max, v, block_size: int):
    """The causal prefix sums in tiles of `block_size`, the state carried with the running key max (rescaled by
    exp(M_old - M_new) as the max grows); equals `_causal_kernel` summed (tested)."""
    B, T, N, F = phi_q.shape
    K, V = unit_k.shape[2], v.shape[-1]
    G = N // K
    C = min(block_size, T)
    pad = (-T) % C
    values = jnp.concatenate([v.astype(jnp.float32), jnp.ones((*v.shape[:-1], 1), jnp.float32)], -1)
    # Padding goes after the last row, so it only reaches padded rows (dropped); its max repeats the last key's.
    padded = [jnp.pad(a, [(0, 0), (0, pad)] + [(0, 0)] * (a.ndim - 2)) for a in (phi_q, unit_k, values)]
    key_max = jnp.pad(key_max, [(0, 0), (0, pad), (0, 0)], mode="edge")
    n = (T + pad) // C

    def chunks(a):
        return jnp.moveaxis(a.reshape(B, n, C, *a.shape[2:]), 1, 0)

    q_c = chunks(padded[0]).reshape(n, B, C, K, G, F)
    lower = jnp.tril(jnp.ones((C, C), bool))

    def step(carry, tile):
        state, previous = carry  # state [B, K, F, V + 1] stabilised by previous [B, K]
        q, k, c, w = tile
        rows = jnp.maximum(previous[:, None], jax.lax.cummax(c, axis=1))  # [B, C, K]: M_t
        inter = jnp.einsum("bckgf,bkfv->bckgv", q, state, precision=HIGHEST) * jnp.exp(
            previous[:, None] - rows)[..., None, None]
        shift = jnp.exp(jnp.where(lower[None, :, :, None], c[:, None] - rows[:, :, None], -jnp.inf))  # [B,C,C,K]
        scores = jnp.einsum("bckgf,bskf->bkgcs", q, k, precision=HIGHEST) * shift.transpose(0, 3, 1, 2)[:, :, None]
        intra = jnp.einsum("bkgcs,bskv->bckgv", scores, w, precision=HIGHEST)
        last = rows[:, -1]
        state = state * jnp.exp(previous - last)[..., None, None] + jnp.einsum(
            "bskf,bskv->bkfv", k * jnp.exp(c - last[:, None])[..., None], w, precision=HIGHEST)
        return (state, last), inter + intra

    start = (jnp.zeros((B, K, F, V + 1), jnp.float32), key_max[:, 0])  # an empty state: any stabiliser will do
    _, out = jax.lax.scan(step, start, (q_c, chunks(padded[1]), chunks(key_max), chunks(padded[2])))
    out = jnp.moveaxis(out, 0, 1).reshape(B, n * C, N, V + 1)[:, :T]
    # eps part of every visible key: eps / sqrt(m) * sum_m phi(q_t)_m * (sum_{j<=t} v_j, t + 1)
    weight = (EPS / F ** 0.5) * jnp.sum(phi_q, axis=-1).reshape(B, T, K, G, 1)
    prefix = jnp.cumsum(values, axis=1)[:, :, :, None]  # [B, T, K, 1, V + 1]
    out = out + (weight * prefix).reshape(B, T, N, V + 1)
    return out[..., :V], out[..., V:]


def _normalised(sums: tuple[jax.Array, jax.Array]) -> jax.Array:
    numerator, denominator = sums  # features >= eps / sqrt(m) > 0: the normaliser is > 0, no floor needed
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
    if not isinstance(num_features, int) or isinstance(num_features, bool) or num_features < 1:
        raise ValueError(f"performer.num_features: expected an int >= 1, got {num_features!r}")
    check_block_size("performer", block_size)
    implementation = resolve_implementation("performer", implementation, IMPLEMENTATIONS)
    w = _features_or_default(features, num_features, H, seed)
    phi_q = _query_features(args.q, w)  # [B, T, N, m]
    if causal:
        unit_k, key_max = _unit_keys(args.k, w)
        if implementation == "reference":
            visible = jnp.tril(jnp.ones((T, S), bool))
            sums = kernel_sums(_causal_kernel(phi_q, unit_k, key_max, visible), args.v)
        else:
            sums = _causal_sums(phi_q, unit_k, key_max, args.v, block_size)
    elif implementation == "reference":
        sums = kernel_sums(_masked_kernel(phi_q, _key_features(args.k, w), None), args.v)
    else:
        sums = feature_sums(phi_q, _key_features(args.k, w), args.v)
    out = _normalised(sums).astype(args.q.dtype)
    return out.reshape(args.batch_shape + out.shape[1:])


def performer_reference(query, key, value, **kwargs):
    return performer_attention(query, key, value, implementation="reference", **kwargs)


def performer_decode(query, key_cache, value_cache, *, query_positions, features=None, num_features: int = 16,
                     seed: int = 0, block_size: int = 64):
    """The registry decode rule: causal FAVOR+ of queries at `query_positions` over a KV cache. Each query's key
    stabiliser is the max over the cache slots it sees, as in the full-sequence call, so the rows match it."""
    del block_size
    w = _features_or_default(features, num_features, query.shape[-1], seed)
    positions = jnp.asarray(query_positions)
    visible = jnp.arange(key_cache.shape[1])[None, :] <= positions[:, None]  # [T, L]
    phi_q = _query_features(query, w)
    # Slots past the last query may hold anything (stale or zeros): they are masked, and zeroed so they stay finite.
    unit_k, key_max = _unit_keys(jnp.where(visible[-1][None, :, None, None], key_cache, 0.0), w)
    return _normalised(kernel_sums(_causal_kernel(phi_q, unit_k, key_max, visible), value_cache)).astype(query.dtype)
