"""DCAL: Dual Cross-Attention Learning (Zhu, Ke, Li, Liu, Tian, Shan, 2022, "Dual Cross-Attention Learning for
Fine-Grained Visual Categorization and Object Re-Identification", CVPR 2022, arXiv 2205.02151, §3.2 GLCA, §3.3 PWCA).

No official code was found; this follows the paper text (spec vision_mechanisms.md §8).

Attention rollout (§3.2, after Abnar & Zuidema 2020): with S_l the attention map of block l averaged over heads,

    S̄_l = 0.5 S_l + 0.5 E          Ŝ_l = S̄_l S̄_{l-1} ... S̄_1        (E the identity; later blocks on the left)

The paper writes S for a single head; averaging the heads is the rollout convention it cites (and the spec's reading).

GLCA (global-local cross attention): the first row of Ŝ (the class token's accumulated attention) ranks the query
rows; the top R = ceil(ratio * T) form the local queries Q^l, which attend over all keys and values:

    GLCA(Q^l, K^g, V^g) = softmax(Q^l K^g^T / sqrt(d)) V^g          -> R rows

The paper selects "top R query vectors" from the first row of Ŝ, which includes the class token's own column;
`rollout_scores` can exclude leading class tokens from the candidates (the spec's "top-R patch tokens").

PWCA (pair-wise cross attention, training only, weights shared with self attention): a query of image 1 attends over
the keys and values of both images, one softmax over all of them:

    PWCA(Q_1, [K_1; K_2], [V_1; V_2]) = softmax(Q_1 [K_1; K_2]^T / sqrt(d)) [V_1; V_2]

The paper samples the distractor image I_2 at random from the training set; `pwca_attention` without an explicit
distractor pairs sample b with sample (b + pair_shift) mod B of the batch (a random pairing when the batch is
shuffled).

Neither has a causal form in the paper (both are non-causal vision mechanisms): the top-R selection ranks all rows at
once, and a distractor image has no position order relative to the query image; causal=True raises.
"""

from __future__ import annotations

import math
from typing import Sequence

import jax
import jax.numpy as jnp

from attnx.ops.builtin import softmax_attention

HIGHEST = jax.lax.Precision.HIGHEST
F32 = jnp.float32


def _refuse_causal(name: str, causal: bool) -> None:
    if causal:
        raise ValueError(f"{name}: causal=True is not supported: DCAL's {name.upper()} is non-causal vision attention "
                         f"(patterns NS and NC)")


def attention_rollout(attentions):
    """Ŝ [*B, T, T] from the blocks' attention maps, first block first.

    attentions: a sequence of maps [*B, N, T, T] (rows sum to 1) or one stacked array [L, *B, N, T, T].
    """
    if isinstance(attentions, (list, tuple)):
        if not attentions:
            raise ValueError("attention_rollout.attentions: expected at least one attention map, got none")
        attentions = jnp.stack([jnp.asarray(a) for a in attentions])
    attentions = jnp.asarray(attentions)
    if attentions.ndim < 4 or attentions.shape[-1] != attentions.shape[-2]:
        raise ValueError(f"attention_rollout.attentions: expected [L, *B, N, T, T] (square maps), got "
                         f"{attentions.shape}")
    T = attentions.shape[-1]
    residual = 0.5 * jnp.mean(attentions.astype(F32), axis=-3) + 0.5 * jnp.eye(T, dtype=F32)  # [L, *B, T, T]

    def accumulate(rollout, layer):
        return jnp.matmul(layer, rollout, precision=HIGHEST), None

    rollout, _ = jax.lax.scan(accumulate, jnp.broadcast_to(jnp.eye(T, dtype=F32), residual.shape[1:]), residual)
    return rollout


def rollout_scores(rollout, *, num_prefix: int = 1, exclude_prefix: bool = True):
    """The class token's row of the rollout, [*B, T]: row 0 of Ŝ. With exclude_prefix the first `num_prefix`
    (class) tokens score -inf, so they are never picked as local queries while enough patch tokens remain."""
    scores = rollout[..., 0, :]
    if exclude_prefix and num_prefix:
        scores = scores.at[..., :num_prefix].set(-jnp.inf)
    return scores


def num_selected(length: int, ratio: float) -> int:
    """R = ceil(ratio * length), at least 1 (static, so jit sees one shape)."""
    if not isinstance(ratio, (int, float)) or isinstance(ratio, bool) or not 0.0 < ratio <= 1.0:
        raise ValueError(f"glca.ratio: expected a number in (0, 1], got {ratio!r}")
    return max(1, math.ceil(ratio * length - 1e-9))  # the epsilon keeps e.g. 0.3 * 10 from rounding up to 4


def glca_select(scores, ratio: float, count: int | None = None):
    """Indices [*B, R] of the R highest scores (highest first; ties to the lower index, as lax.top_k does);
    R = ceil(ratio * T), or `count` when given."""
    T = scores.shape[-1]
    if count is None:
        count = num_selected(T, ratio)
    elif not isinstance(count, int) or isinstance(count, bool) or not 1 <= count <= T:
        raise ValueError(f"glca.count: expected an int in [1, {T}] (query rows to select), got {count!r}")
    _, chosen = jax.lax.top_k(scores, count)
    return chosen


def _check_scores(query, scores):
    if scores is not None and tuple(scores.shape) != tuple(query.shape[:-2]):
        raise ValueError(f"glca.scores: expected one score per query row, shape [*B, T] = "
                         f"{tuple(query.shape[:-2])}, got {tuple(scores.shape)}")


def glca(query, key, value, scores, *, ratio: float = 1.0, count: int | None = None, **kwargs):
    """(out [*B, R, N, V], indices [*B, R]): the R query rows of highest score attend over all keys and values.

    query [*B, T, N, H], key [*B, S, K, H], value [*B, S, K, V], scores [*B, T] (e.g. `rollout_scores`); R =
    ceil(ratio * T) or `count`; kwargs go to softmax attention (scale, implementation, mask over the keys, ...).
    """
    _check_scores(query, scores)
    if scores is None:
        raise ValueError("glca.scores: the selection needs one score per query row (the class token's rollout row)")
    chosen = glca_select(scores, ratio, count)
    local = jnp.take_along_axis(query, chosen[..., None, None], axis=-3)
    return softmax_attention(local, key, value, **kwargs), chosen


def _scatter_rows(rows, chosen, length):
    """rows [*B, R, N, V] placed at rows `chosen` [*B, R] of a zero [*B, length, N, V]."""
    place = jax.nn.one_hot(chosen, length, dtype=rows.dtype)  # [*B, R, T]
    return jnp.einsum("...rt,...rnv->...tnv", place, rows)


def glca_attention(query, key, value, *, causal: bool = False, scores=None, ratio: float = 1.0, **kwargs):
    """GLCA in the registry's calling convention: out [*B, T, N, V] holds the local queries' rows at their
    positions and zeros at the rows not selected (like fully masked rows). scores None: every row is a candidate
    of equal rank, which only ratio = 1 (all rows: plain cross attention) makes well defined."""
    _refuse_causal("glca", causal)
    _check_scores(query, scores)
    T = query.shape[-3]
    if scores is None:
        if num_selected(T, ratio) != T:
            raise ValueError(f"glca.scores: needed when ratio={ratio} selects fewer than all T={T} query rows (pass "
                             f"the class token's rollout row, `rollout_scores(attention_rollout(maps))`)")
        return softmax_attention(query, key, value, **kwargs)
    rows, chosen = glca(query, key, value, scores, ratio=ratio, **kwargs)
    return _scatter_rows(rows, chosen, T).astype(query.dtype)


def glca_reference(query, key, value, *, causal: bool = False, scores=None, ratio: float = 1.0, **kwargs):
    """Dense attention of every query row (reference softmax), rows outside the top R (by a full sort) zeroed."""
    _refuse_causal("glca", causal)
    _check_scores(query, scores)
    out = softmax_attention(query, key, value, implementation="reference", **kwargs)
    T = query.shape[-3]
    R = num_selected(T, ratio)
    if scores is None:
        if R != T:
            raise ValueError(f"glca.scores: needed when ratio={ratio} selects fewer than all T={T} query rows")
        return out
    rank = jnp.argsort(jnp.argsort(-scores, axis=-1, stable=True), axis=-1, stable=True)  # 0 = highest score
    return jnp.where((rank < R)[..., None, None], out, 0).astype(query.dtype)


def _check_distractor(key, value, distractor_key, distractor_value):
    if (distractor_key is None) != (distractor_value is None):
        raise ValueError("pwca: give both distractor_key and distractor_value, or neither")
    if distractor_key is None:
        return
    if distractor_key.shape[:-3] != key.shape[:-3] or distractor_key.shape[-2:] != key.shape[-2:]:
        raise ValueError(f"pwca.distractor_key: expected [*B, S2, K, H] with *B, K, H of key {key.shape}, got "
                         f"{distractor_key.shape}")
    if distractor_value.shape[:-1] != distractor_key.shape[:-1] or distractor_value.shape[-1] != value.shape[-1]:
        raise ValueError(f"pwca.distractor_value: expected [*B, S2, K, V] matching distractor_key "
                         f"{distractor_key.shape} and value {value.shape}, got {distractor_value.shape}")


def _pair(key, value, distractor_key, distractor_value, pair_shift):
    _check_distractor(key, value, distractor_key, distractor_value)
    if distractor_key is not None:
        return distractor_key, distractor_value
    if not isinstance(pair_shift, int) or isinstance(pair_shift, bool):
        raise ValueError(f"pwca.pair_shift: expected an int, got {pair_shift!r}")
    if key.ndim < 4:
        raise ValueError(f"pwca: without distractor_key/distractor_value the distractor is another sample of the "
                         f"batch, but key {key.shape} has no batch axis")
    # Sample b is paired with sample b + pair_shift of the leading batch axis.
    return jnp.roll(key, -pair_shift, axis=0), jnp.roll(value, -pair_shift, axis=0)


def pwca(query, key, value, distractor_key, distractor_value, **kwargs):
    """softmax(Q_1 [K_1; K_2]^T) [V_1; V_2] over S + S2 keys (own keys first); kwargs go to softmax attention,
    whose mask/bias then cover the S + S2 concatenated keys."""
    _check_distractor(key, value, distractor_key, distractor_value)
    keys = jnp.concatenate([key, distractor_key.astype(key.dtype)], axis=-3)
    values = jnp.concatenate([value, distractor_value.astype(value.dtype)], axis=-3)
    return softmax_attention(query, keys, values, **kwargs)


def pwca_attention(query, key, value, *, causal: bool = False, distractor_key=None, distractor_value=None,
                   pair_shift: int = 1, **kwargs):
    """PWCA in the registry's calling convention; the distractor is explicit or, when not given, the batch sample
    `pair_shift` ahead (module docstring)."""
    _refuse_causal("pwca", causal)
    distractor_key, distractor_value = _pair(key, value, distractor_key, distractor_value, pair_shift)
    return pwca(query, key, value, distractor_key, distractor_value, **kwargs)


def pwca_reference(query, key, value, *, causal: bool = False, distractor_key=None, distractor_value=None,
                   pair_shift: int = 1, scale: float | None = None):
    """Two logit blocks (own image, distractor) normalised by one joint softmax, written out densely in float32."""
    _refuse_causal("pwca", causal)
    distractor_key, distractor_value = _pair(key, value, distractor_key, distractor_value, pair_shift)
    T, N, H = query.shape[-3:]
    K = key.shape[-2]
    G = N // K
    scale = H ** -0.5 if scale is None else scale
    q = query.astype(F32).reshape(*query.shape[:-2], K, G, H)
    logits = [jnp.einsum("...tkgh,...skh->...kgts", q, k.astype(F32), precision=HIGHEST) * scale
              for k in (key, distractor_key)]
    top = jax.lax.stop_gradient(jnp.maximum(*(jnp.max(s, axis=-1, keepdims=True) for s in logits)))
    weights = [jnp.exp(s - top) for s in logits]
    denominator = sum(jnp.sum(w, axis=-1, keepdims=True) for w in weights)
    out = sum(jnp.einsum("...kgts,...skv->...tkgv", w / denominator, v.astype(F32), precision=HIGHEST)
              for w, v in zip(weights, (value, distractor_value)))
    return out.reshape(*query.shape[:-1], value.shape[-1]).astype(query.dtype)


def rollout_reference(attentions: Sequence) -> jax.Array:
    """The rollout as a Python loop of matrix products (tests)."""
    rollout = None
    for a in attentions:
        layer = 0.5 * jnp.mean(jnp.asarray(a, F32), axis=-3) + 0.5 * jnp.eye(a.shape[-1], dtype=F32)
        rollout = layer if rollout is None else jnp.matmul(layer, rollout, precision=HIGHEST)
    return rollout
