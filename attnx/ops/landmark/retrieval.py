"""The inference path: top-k block retrieval by landmark keys, then the grouped softmax over the gathered blocks.

Following `lm_benchmark/models/caches/mem_cache.py` (`MemLMCacheStorage.retrieve_for_query`): every complete
earlier block is scored by its landmark key, s(t, L_g) = q_t . k_{L_g} / sqrt(H), turned into a softmax over the
candidate blocks, and the top-k blocks are taken per query and head (`per_token_and_head`, the default), or by the
max of those probabilities over heads (`max_over_heads`) or over the query rows given together
(`max_over_tokens`; the code's chunk of queries: not causal across those rows). The chosen blocks' b+1 keys and
values are gathered, plus the query's own incomplete block, and the same grouped softmax as training is applied:
landmark logits gate the blocks, the own block's tokens enter the outer softmax directly.

With top_k >= the number of earlier blocks every block is retrieved and the result equals the training path.

Departures from the code, all because attnx attention functions see keys after rotary positions:
- The code re-rotates the retrieved keys ("mem_jump": retrieved blocks are placed just before the current chunk,
  `rotary_mem_jump.py`) and stores keys before rotation. Here cached keys keep the positions they were rotated
  with; a model wanting mem_jump positions would have to cache unrotated keys (a models/ change, not made).
- The code processes the prompt in chunks of 250 tokens with only the tail block kept uncached; the decode rule
  here keeps all of the query's own block and retrieves among the earlier complete blocks, whatever the chunking.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from attnx.ops.landmark.common import HIGHEST, masked_exp, masked_softmax, safe_max

METHODS = ("per_token_and_head", "max_over_heads", "max_over_tokens")


def retrieve(q, landmark_k, top_k: int, *, valid, method: str, scale: float):
    """Canonical q [B, T, N, H], landmark_k [B, nb, K, H], valid [B|1, T, nb] bool -> (indices [B, T, N, top_k]
    int32, selected [B, T, N, top_k] bool: False where fewer than top_k blocks were valid)."""
    B, T, N, H = q.shape
    nb, K = landmark_k.shape[1], landmark_k.shape[2]
    s = jnp.einsum("btkgh,bskh->btkgs", q.astype(jnp.float32).reshape(B, T, K, N // K, H),
                   landmark_k.astype(jnp.float32), precision=HIGHEST).reshape(B, T, N, nb) * scale
    valid = jnp.broadcast_to(valid[:, :, None, :], (B, T, N, nb))
    if method == "per_token_and_head":
        score = s  # the softmax is monotone: rank the logits themselves (no ties from underflow)
    else:
        p = masked_softmax(s, valid)
        score = jnp.max(p, axis=2 if method == "max_over_heads" else 1, keepdims=True)
    score = jax.lax.stop_gradient(jnp.where(valid, jnp.broadcast_to(score, s.shape), -jnp.inf))
    _, indices = jax.lax.top_k(score, top_k)
    return indices, jnp.take_along_axis(valid, indices, axis=-1)


def retrieval_attention(q, k, v, query_positions, *, block_size: int, top_k: int | None, method: str,
                        scale: float) -> jax.Array:
    """Canonical q [B, T, N, H] at absolute positions [T], k [B, L, K, H], v [B, L, K, V] where slot j holds
    position j (slots after a query's position are ignored) -> [B, T, N, V] float32."""
    B, T, N, H = q.shape
    L, K, V = k.shape[1], k.shape[2], v.shape[3]
    G, b1 = N // K, block_size + 1
    nb = -(-L // b1)
    pad = ((0, 0), (0, nb * b1 - L), (0, 0), (0, 0))
    kb = jnp.pad(k.astype(jnp.float32), pad).reshape(B, nb, b1, K, H)
    vb = jnp.pad(v.astype(jnp.float32), pad).reshape(B, nb, b1, K, V)
    q = q.astype(jnp.float32)
    positions = jnp.asarray(query_positions, jnp.int32)
    c = positions // b1
    i = jnp.arange(b1)

    # The query's own block: its ordinary tokens up to the query.
    k_own, v_own = kb[:, c], vb[:, c]  # [B, T, b1, K, *]
    s_own = jnp.einsum("btkgh,btjkh->btkgj", q.reshape(B, T, K, G, H), k_own, precision=HIGHEST)
    s_own = s_own.reshape(B, T, N, b1) * scale
    own = ((i[None, :] < block_size) & (c[:, None] * b1 + i[None, :] <= positions[:, None]))[None, :, None, :]

    picks = nb if top_k is None else min(top_k, nb)
    if picks == 0:
        p_own = masked_softmax(s_own, own)
        gathered = jnp.zeros((B, T, N, V), jnp.float32)
    else:
        valid = (jnp.arange(nb)[None, :] < c[:, None])[None]  # complete blocks before the query's own
        indices, selected = retrieve(q, kb[:, :, block_size], picks, valid=valid, method=method, scale=scale)
        batch, head = jnp.arange(B)[:, None, None, None], (jnp.arange(N) // G)[None, None, :, None]
        k_sel, v_sel = kb[batch, indices, :, head], vb[batch, indices, :, head]  # [B, T, N, picks, b1, *]
        s_sel = jnp.einsum("btnh,btnpjh->btnpj", q, k_sel, precision=HIGHEST) * scale
        ordinary = i < block_size
        e = masked_exp(s_sel, ordinary, safe_max(s_sel, ordinary))
        block_values = jnp.einsum("btnpj,btnpjv->btnpv", e, v_sel, precision=HIGHEST)
        block_values = block_values / jnp.sum(e, axis=-1, keepdims=True)  # b >= 1 finite terms: never 0
        logits = jnp.concatenate([s_sel[..., block_size], s_own], axis=-1)
        mask = jnp.concatenate([selected, jnp.broadcast_to(own, s_own.shape)], axis=-1)
        p = masked_softmax(logits, mask)
        p_own = p[..., picks:]
        gathered = jnp.einsum("btnp,btnpv->btnv", p[..., :picks], block_values, precision=HIGHEST)
    mine = jnp.einsum("btkgj,btjkv->btkgv", p_own.reshape(B, T, K, G, b1), v_own, precision=HIGHEST)
    return gathered + mine.reshape(B, T, N, V)


def retrieval_keep(q, k, *, block_size: int, top_k: int | None, method: str, scale: float) -> jax.Array:
    """The same selection for a full causal sequence, written densely for the oracle: [B, T, N, nb] bool."""
    T, L = q.shape[1], k.shape[1]
    b1 = block_size + 1
    nb = -(-L // b1)
    picks = nb if top_k is None else min(top_k, nb)
    if picks == 0:
        return jnp.zeros((q.shape[0], T, q.shape[2], nb), bool)
    kb = jnp.pad(k, ((0, 0), (0, nb * b1 - L), (0, 0), (0, 0))).reshape(k.shape[0], nb, b1, *k.shape[2:])
    valid = (jnp.arange(nb)[None, :] < (jnp.arange(T) // b1)[:, None])[None]
    indices, selected = retrieve(q, kb[:, :, block_size], picks, valid=valid, method=method, scale=scale)
    return jnp.any(jax.nn.one_hot(indices, nb, dtype=bool) & selected[..., None], axis=-2)
