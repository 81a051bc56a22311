"""The training fast path for regular spacing: one pass over the key blocks with an online outer softmax.

Keys and values are reshaped to [nb, b+1] (the last block zero-padded). For a query t in block c and each key
block g, the scan forms the block's logits [T, b+1] only and reduces them to one group logit and one group value:

    g <  c   group logit = s(t, L_g)             value o_g = softmax over the block's b ordinary tokens of v
    g == c   group logit = LSE of the ordinary tokens j <= t of block c   value = their softmax of v
    g >  c   absent

The outer softmax over group logits, accumulated online as in FlashAttention, then gives exactly w of spec §4 (b):
p_{L_g} p^g_j for earlier blocks and p_j = exp(s_j) / Z for block c (its group logit is the LSE of its members, so
its share of Z is the sum of their exps). No [T, S] weights exist at any time; the scan body is rematerialised
(`jax.checkpoint`) so reverse mode keeps the per-step carry, not per-step logits.

Not done: skipping the absent blocks g > c per query tile (about half the work is masked out, as in dense causal).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from attnx.ops.landmark.common import HIGHEST, masked_exp, safe_max


def landmark_chunked(q, k, v, *, block_size: int, scale: float) -> jax.Array:
    """Canonical q [B, T, N, H], k [B, S, K, H], v [B, S, K, V], T == S, landmarks at (p + 1) % (b + 1) == 0
    -> [B, T, N, V] float32."""
    B, T, N, H = q.shape
    S, K, V = k.shape[1], k.shape[2], v.shape[3]
    G, b1 = N // K, block_size + 1
    nb = -(-S // b1)
    pad = ((0, 0), (0, nb * b1 - S), (0, 0), (0, 0))
    kb = jnp.pad(k.astype(jnp.float32), pad).reshape(B, nb, b1, K, H).swapaxes(0, 1)
    vb = jnp.pad(v.astype(jnp.float32), pad).reshape(B, nb, b1, K, V).swapaxes(0, 1)
    qg = q.astype(jnp.float32).reshape(B, T, K, G, H)
    t = jnp.arange(T)
    c = t // b1
    ordinary = jnp.arange(b1) < block_size

    def body(carry, xs):
        m, denominator, acc = carry  # [B, T, K, G], [B, T, K, G], [B, T, K, G, V]
        g, kg, vg = xs
        s = jnp.einsum("btkgh,bjkh->btkgj", qg, kg, precision=HIGHEST) * scale
        before, here = (g < c)[:, None], (g == c)[:, None]  # [T, 1]
        member = ordinary[None, :] & (before | (here & (g * b1 + jnp.arange(b1)[None, :] <= t[:, None])))
        member = member[None, :, None, None, :]  # [1, T, 1, 1, b1]
        e = masked_exp(s, member, safe_max(s, member))
        total = jnp.sum(e, axis=-1)
        total = jnp.where(total > 0, total, 1.0)
        value = jnp.einsum("btkgj,bjkv->btkgv", e, vg, precision=HIGHEST) / total[..., None]
        lse = safe_max(s, member)[..., 0] + jnp.log(total)
        present = (g <= c)[None, :, None, None]
        logit = jnp.where(before[None, :, :, None], s[..., block_size], lse)
        # The running max only stabilises; the ratio acc / denominator does not depend on it.
        m_new = jax.lax.stop_gradient(jnp.maximum(m, jnp.where(present, logit, -jnp.inf)))
        m_safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
        alpha = jnp.where(jnp.isfinite(m), jnp.exp(jnp.where(jnp.isfinite(m), m, 0.0) - m_safe), 0.0)
        beta = masked_exp(logit, present, m_safe)
        carry = (m_new, denominator * alpha + beta, acc * alpha[..., None] + beta[..., None] * value)
        return carry, None

    init = (jnp.full((B, T, K, G), -jnp.inf, jnp.float32), jnp.zeros((B, T, K, G), jnp.float32),
            jnp.zeros((B, T, K, G, V), jnp.float32))
    (_, denominator, acc), _ = jax.lax.scan(jax.checkpoint(body), init, (jnp.arange(nb), kb, vb))
    out = acc / jnp.where(denominator > 0, denominator, 1.0)[..., None]
    return out.reshape(B, T, N, V)
