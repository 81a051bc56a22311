"""The naive oracle of Landmark Attention: the dense weights w [B, T, N, S] built exactly as spec §4 (b) writes them.

For a query t in block c (c = number of landmarks before position t; the landmark closing block c belongs to c):

    outer softmax p over   {j <= t in block c, not a landmark}  ∪  {L_g : g < c}
    inner softmax p^g over the ordinary tokens of each earlier block g
    w_j = p_j (block c),   w_j = p_{L_g} p^g_j (block g < c),   w_{L_g} = 0      =>   sum_j w_j = 1

This is what the official code computes (epfml/landmark-attention `lm_benchmark/models/landmark.py`,
`landmark_grouped_softmax` with the masks built in `CausalSelfAttention.forward`): its scatter max/sum keyed by
`cumsum(is_mem)` are the per-group reductions below (jax.ops.segment_*), and its `last_section_mask` is block c.
The landmark of block c itself is masked, also for the query at that landmark. A row with nothing to attend to (a
landmark at position 0 under a general `is_landmark`) gets all-zero weights, as the code's `denom < 0.5 -> 0`.

`keep` (optional, per query and head, indexed by block id) removes earlier blocks entirely, landmark and tokens:
the retrieval path's selection written densely, so the same oracle checks the gathered top-k path.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from attnx.ops.landmark.common import HIGHEST, masked_exp, masked_softmax


def _segment(op, x: jax.Array, ids: jax.Array) -> jax.Array:
    """op over keys that share a block id: x [B, T, N, S], ids [B|1, S] (sorted) -> [B, T, N, S] indexed by id
    (at most S blocks)."""
    S = x.shape[-1]

    def one(xb, ib):
        return jnp.moveaxis(op(jnp.moveaxis(xb, -1, 0), ib, num_segments=S, indices_are_sorted=True), 0, -1)

    return jax.vmap(one)(x, jnp.broadcast_to(ids, (x.shape[0], S)))


def _per_key(per_block: jax.Array, ids: jax.Array) -> jax.Array:
    """[B|1, T, N, G] indexed by block id -> [B, T, N, S]: each key's entry of its own block."""
    shape = jnp.broadcast_shapes(per_block.shape[:-1], (ids.shape[0], 1, 1))
    index = jnp.broadcast_to(ids[:, None, None, :], shape + (ids.shape[-1],))
    return jnp.take_along_axis(jnp.broadcast_to(per_block, shape + per_block.shape[-1:]), index, axis=-1)


def landmark_weights(q: jax.Array, k: jax.Array, is_landmark: jax.Array, *, scale: float,
                     keep: jax.Array | None = None) -> jax.Array:
    """q [B, T, N, H], k [B, S, K, H] with T == S (causal self attention), is_landmark [B|1, S] bool,
    keep [B|1, T, N, G] bool over block ids or None -> w [B, T, N, S] float32."""
    B, T, N, H = q.shape
    S, K = k.shape[1], k.shape[2]
    G = N // K
    s = jnp.einsum("btkgh,bskh->btkgs", q.astype(jnp.float32).reshape(B, T, K, G, H), k.astype(jnp.float32),
                   precision=HIGHEST).reshape(B, T, N, S) * scale
    is_lm = is_landmark.astype(bool)
    block = jnp.cumsum(is_lm.astype(jnp.int32), axis=-1) - is_lm.astype(jnp.int32)  # landmarks strictly before j
    key_block, query_block = block[:, None, None, :], block[:, :T, None, None]
    lm = is_lm[:, None, None, :]
    visible = (jnp.arange(S)[None, :] <= jnp.arange(T)[:, None])[None, :, None, :]
    current = visible & (key_block == query_block) & ~lm
    earlier = visible & (key_block < query_block)
    if keep is not None:
        earlier = earlier & _per_key(keep, block)
    gates, inner = earlier & lm, earlier & ~lm

    p = masked_softmax(s, current | gates)
    shift = jnp.where(inner, s, -jnp.inf)
    shift = jax.lax.stop_gradient(_segment(jax.ops.segment_max, shift, block))  # per-block max: a stabiliser
    shift = _per_key(jnp.where(jnp.isfinite(shift), shift, 0.0), block)
    e = masked_exp(s, inner, shift)
    denominator = _per_key(_segment(jax.ops.segment_sum, e, block), block)
    p_inner = e / jnp.where(denominator > 0, denominator, 1.0)
    gate = _per_key(_segment(jax.ops.segment_sum, jnp.where(gates, p, 0.0), block), block)  # p_{L_g} per key
    return jnp.where(current, p, 0.0) + gate * p_inner


def landmark_reference(q, k, v, is_landmark, *, scale: float, keep=None) -> jax.Array:
    """Canonical q [B, T, N, H], k [B, S, K, H], v [B, S, K, V] -> [B, T, N, V] float32 through the dense w."""
    B, T, N, _ = q.shape
    K, V = v.shape[2], v.shape[3]
    w = landmark_weights(q, k, is_landmark, scale=scale, keep=keep).reshape(B, T, K, N // K, -1)
    out = jnp.einsum("btkgs,bskv->btkgv", w, v.astype(jnp.float32), precision=HIGHEST)
    return out.reshape(B, T, N, V)
