"""LARA: linear randomized attention (Zheng et al., 2022, "Linear Complexity Randomized Self-attention Mechanism",
arXiv 2204.04667, §4 eq. (10)-(12), Algorithm 1), as benchmarked in CAB (`efficient_attention/modules/lara.py`,
pattern NS, C = 16 segment-mean proposals).

Random-feature attention with multiple importance sampling: C Gaussian proposals N(mu_c, I) with mu_c = q~_c + k~_c
(segment means of queries and keys), one sample w_c per proposal, and self-normalised importance weights. With
x' = x / sqrt(H) and the code's positive random features (`prm_projection`, unnormalised, in log space):

    f_c(x)    = w_c . x' - |x|^2 / (2 sqrt(H))
    kv_c      = softmax_s(f_c(k_s)) V                                      (per-proposal value summary, [C, V])
    r_{c,t}   = mu_c . q'_t + f_c(q_t) + logsumexp_s f_c(k_s) - f_c(mu_c)   (log importance ratio)
    o_t       = sum_c softmax_c(r_{:, t}) kv_c

Linear in T: every term is [C, T] or [C, V]. Faithful to the code's formula, including its H^-1/2 (not H^-1/4)
scaling inside the features, its segment split when C does not divide T, and C = T when T < C.

Randomness: the code samples w_c = mu_c + eps in training (`self.training`) and uses w_c = mu_c (no noise) in
evaluation. Here `training=None` (the default) lets `rng` decide: `rng=None` is the evaluation mode, deterministic,
and a PRNG key `rng` draws the training-mode sample w_c = mu_c + eps, eps ~ N(0, I). `training=True` / `False`
states the mode explicitly (True needs `rng`; False refuses one, since evaluation draws nothing); the model layer's
weight module (models/layers/mixers/lara.py) passes both from its NNX train/eval state.

The code's three options, all off in CAB, are here too: `antithetic` (2C proposals mu_c +- eps_c),
`optimal_approximation` (log |v_t| added to the log ratio of query t, indexed by the query position exactly as the
code does) and `proposal_gen='adaptive-seg-means'` (the code's adaptive segment means: `q_bar_proj` / `k_bar_proj`,
two Linear(H, H) maps shared by all heads, applied to q~ and k~ after the segment mean; the caller owns the weights
and passes them as `segment_projections`). Self attention only (CAB: no causal, no cross).

The official vision LARA (HKUNLP's efficient-attention, `LinearRA` for DeiT/PVT) uses a different proposal family
(2-D adaptive average pooling + Linear + LayerNorm, and the 'mis-opt' weights alpha); it is not implemented here:
this module is CAB's LARA, the one the benchmark spec names.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from attnx.ops.efficient.common import HIGHEST, group, segment_matrix
from attnx.ops.efficient.sampling import sampled_self_attention_setup

IMPLEMENTATIONS = ("linear", "reference")
PROPOSALS = ("seg-means", "adaptive-seg-means")  # the code's proposal_gen values


def _features(x, w, H: int):
    """log features f_c(x_l) = w_c . x_l / sqrt(H) - |x_l|^2 / (2 sqrt(H)): x [B, L, K, G, H], w [B, C, K, G, H]
    -> [B, K, G, C, L]."""
    projected = jnp.einsum("bckgh,blkgh->bkgcl", w, x, precision=HIGHEST) * H ** -0.5
    squared = jnp.sum(jnp.square(x), axis=-1) * H ** -0.5 / 2  # [B, L, K, G]
    return projected - jnp.transpose(squared, (0, 2, 3, 1))[:, :, :, None, :]


def lara_attention(query, key, value, *, causal: bool = False, num_landmarks: int = 16, rng=None,
                   training: bool | None = None, antithetic: bool = False, optimal_approximation: bool = False,
                   proposal_gen: str = "seg-means", segment_projections=None, implementation: str | None = None):
    """query [*B, T, N, H], key [*B, T, K, H], value [*B, T, K, V] -> [*B, T, N, V] (non-causal self only).

    rng: None for the code's deterministic evaluation mode (w = mu), or a PRNG key for w = mu + N(0, I).
    training: None (rng decides), True (the code's training mode: needs rng) or False (evaluation: w = mu, rng
    must be None). antithetic: with rng, 2C proposals: w = mu + eps and mu - eps (the code's use_antithetics; no
    effect without rng). optimal_approximation: add log(|v_t|_2 + 1e-10) to the log importance ratio of query t
    (the code's use_opt_approx). proposal_gen: 'seg-means' (CAB's default) or 'adaptive-seg-means', which needs
    segment_projections = (q_weight [H, H], q_bias [H], k_weight [H, H], k_bias [H]), applied to the segment means
    as x W + b before mu = q~ + k~ (the code's q_bar_proj / k_bar_proj; torch's x W^T + b with W transposed)."""
    args, (B, T, N, H, S, K), implementation = sampled_self_attention_setup(
        "lara", query, key, value, causal=causal, option="num_landmarks", option_value=num_landmarks,
        implementation=implementation, implementations=IMPLEMENTATIONS)
    for name, flag in (("antithetic", antithetic), ("optimal_approximation", optimal_approximation)):
        if not isinstance(flag, bool):
            raise ValueError(f"lara.{name}: expected a bool, got {flag!r}")
    _check_mode(training, rng)
    _check_proposals(proposal_gen, segment_projections)
    G = N // K
    q = group(args.q.astype(jnp.float32), K)  # [B, T, K, G, H]
    # Keys are shared by the G query heads of a group; the proposals mix both, so they are per query head.
    k = jnp.broadcast_to(args.k.astype(jnp.float32)[:, :, :, None, :], (B, S, K, G, H))
    v = args.v.astype(jnp.float32)
    C = min(num_landmarks, T)  # the code: fewer positions than landmarks -> every position is its own mean
    means = segment_matrix(T, C)
    q_bar = jnp.einsum("ct,btkgh->bckgh", means, q, precision=HIGHEST)
    k_bar = jnp.einsum("ct,btkgh->bckgh", means, k, precision=HIGHEST)
    if segment_projections is not None:
        qw, qb, kw, kb = _segment_projections(segment_projections, H)
        q_bar = jnp.einsum("bckgh,hj->bckgj", q_bar, qw, precision=HIGHEST) + qb
        k_bar = jnp.einsum("bckgh,hj->bckgj", k_bar, kw, precision=HIGHEST) + kb
    mu = q_bar + k_bar  # [B, C, K, G, H]
    if rng is None:
        w = mu
    elif antithetic:  # one draw per proposal, used with both signs (the proposals are repeated to 2C)
        noise = jax.random.normal(rng, mu.shape, jnp.float32)
        mu, w = jnp.concatenate([mu, mu], axis=1), jnp.concatenate([mu + noise, mu - noise], axis=1)
    else:
        w = mu + jax.random.normal(rng, mu.shape, jnp.float32)
    log_q = _features(q, w, H)  # [B, K, G, C, T]
    log_k = _features(k, w, H)  # [B, K, G, C, S]
    log_mu = (jnp.einsum("bckgh,bckgh->bkgc", w, mu, precision=HIGHEST) * H ** -0.5
              - jnp.transpose(jnp.sum(jnp.square(mu), -1), (0, 2, 3, 1)) * H ** -0.5 / 2)  # [B, K, G, C]
    stratum = jnp.einsum("bckgh,btkgh->bkgct", mu, q, precision=HIGHEST) * H ** -0.5
    if optimal_approximation:  # the code adds the value norm at the QUERY's index t (self attention, S = T)
        log_v_norm = jnp.log(jnp.linalg.norm(v, axis=-1) + 1e-10)  # [B, T, K]
        stratum = stratum + jnp.transpose(log_v_norm, (0, 2, 1))[:, :, None, None, :]
    log_ratio = stratum + log_q + jax.nn.logsumexp(log_k, -1, keepdims=True) - log_mu[..., None]
    importance = jax.nn.softmax(log_ratio, axis=3)  # [B, K, G, C, T]: self-normalised over proposals
    key_probs = jax.nn.softmax(log_k, axis=-1)  # [B, K, G, C, S]
    if implementation == "reference":  # the explicit [T, S] attention matrix sum_c iw_{c,t} p_c(s)
        weights = jnp.einsum("bkgct,bkgcs->bkgts", importance, key_probs, precision=HIGHEST)
        out = jnp.einsum("bkgts,bskv->btkgv", weights, v, precision=HIGHEST)
    else:
        summaries = jnp.einsum("bkgcs,bskv->bkgcv", key_probs, v, precision=HIGHEST)  # [C, V] per head
        out = jnp.einsum("bkgct,bkgcv->btkgv", importance, summaries, precision=HIGHEST)
    out = out.reshape(B, T, N, -1).astype(args.q.dtype)
    return out.reshape(args.batch_shape + out.shape[1:])


def _check_mode(training, rng) -> None:
    if training is not None and not isinstance(training, bool):
        raise ValueError(f"lara.training: expected None, True or False, got {training!r}")
    if training is True and rng is None:
        raise ValueError("lara.rng: training=True draws w = mu + eps and needs a PRNG key rng (got None)")
    if training is False and rng is not None:
        raise ValueError("lara.rng: training=False is the code's evaluation mode (w = mu), which draws nothing; "
                         "pass rng=None")


def _check_proposals(proposal_gen, segment_projections) -> None:
    if proposal_gen not in PROPOSALS:
        raise ValueError(f"lara.proposal_gen: expected one of {PROPOSALS}, got {proposal_gen!r}")
    if proposal_gen == "adaptive-seg-means" and segment_projections is None:
        raise ValueError("lara.segment_projections: proposal_gen='adaptive-seg-means' needs the weights (q_weight, "
                         "q_bias, k_weight, k_bias); in a model the layer's weight module "
                         "(models/layers/mixers/lara.py) passes them")
    if proposal_gen == "seg-means" and segment_projections is not None:
        raise ValueError("lara.segment_projections: given, but proposal_gen='seg-means' uses the plain segment means; "
                         "set proposal_gen='adaptive-seg-means'")


def _segment_projections(weights, H: int):
    if not isinstance(weights, (tuple, list)) or len(weights) != 4:
        raise ValueError(f"lara.segment_projections: expected (q_weight [H, H], q_bias [H], k_weight [H, H], "
                         f"k_bias [H]), got {type(weights)}")
    qw, qb, kw, kb = (jnp.asarray(x, jnp.float32) for x in weights)
    if qw.shape != (H, H) or kw.shape != (H, H) or qb.shape != (H,) or kb.shape != (H,):
        raise ValueError(f"lara.segment_projections: expected weights [{H}, {H}] and biases [{H}], got "
                         f"{qw.shape}, {qb.shape}, {kw.shape}, {kb.shape}")
    return qw, qb, kw, kb


def lara_reference(query, key, value, **kwargs):
    return lara_attention(query, key, value, implementation="reference", **kwargs)
