"""MIP-Adapter's per-position object weights for merging several image prompts (Huang, Fang, Wang, Lu, Chen, Liu,
Zhang, 2024, "Resolving Multi-Condition Confusion for Finetuning-Free Personalized Image Generation", arXiv
2409.17920, §3.2 "Weighted-merge"; official code hqhQAQ/MIP-Adapter `ip_adapter/attention_processor_multi.py`,
`IPAttnProcessor.__call__` and `cross_attention_attn`).

O objects, each with image tokens (its own decoupled stream) and a separately encoded entity phrase e_o (e.g.
"dog"). For latent position p (query t here):

    A_o = softmax over positions t of (scale * (e_o W_k) q_t^T)         [*B, O, N, L, T], the text W_k (frozen)
    a_o(t) = mean over heads n and entity tokens 1 .. len_o of A_o      (token 0 is the BOS token, skipped)
    r_o(t) = a_o(t) / sum_m a_m(t)                                       (relevance, normalised across objects)
    g(t) = sigmoid(w_t . T(t)),  g^(t) = g(t) / mean_t g(t)              (text gate; T = the text cross-attention
                                                                          output before to_out, w_t = text_to_weight)
    Z = T + lambda * sum_o r_o(t) g^(t) O_o(t)                           (then to_out)

The softmax of A runs over the *query positions* (the code calls get_attention_scores(key, query)): each entity
token distributes one unit of attention over the image. The maps are detached in the code (`.detach()`), so
`entity_relevance` stops gradients; the gate's weight w_t does receive gradients (it is trained with to_k_ip and
to_v_ip). The code divides without an epsilon: every a_o(t) is a mean of softmax probabilities, so positive.

`object_weights` returns r_o(t) g^(t) [*B, O, T]; `mip_attention` feeds lambda times them to
`multi_stream_cross_attention` as per-position stream weights beside the text stream.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from attnx.ops.cross.multi_stream import multi_stream_cross_attention, multi_stream_reference
from attnx.validation import canonicalize


def _concrete(x) -> np.ndarray | None:
    try:
        return np.asarray(x)
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
        return None


def entity_relevance(query, entity_key, entity_lengths, *, scale: float | None = None) -> jax.Array:
    """a_o(t) [*B, O, T] (float32, gradient-stopped).

    query [*B, T, N, H]; entity_key [*B, O, L, K, H]: each object's entity phrase through the text key projection
    (K divides N); entity_lengths [*B, O] ints in [1, L - 1]: the phrase's tokens after BOS (positions 1 .. len).
    """
    query, entity_key = jnp.asarray(query), jnp.asarray(entity_key)
    if entity_key.ndim != query.ndim + 1:
        raise ValueError(f"mip.entity_key: expected [*B, O, L, K, H] (rank {query.ndim + 1} for query "
                         f"{query.shape}), got {entity_key.shape}")
    batch_shape = query.shape[:-3]
    O, L = entity_key.shape[-4], entity_key.shape[-3]
    # The attention contract's checks on one object's phrase (head dim, K | N, batch dims).
    canonicalize(query, entity_key[..., 0, :, :, :], entity_key[..., 0, :, :, :])
    lengths = jnp.asarray(entity_lengths)
    if lengths.shape != (*batch_shape, O) or not jnp.issubdtype(lengths.dtype, jnp.integer):
        raise ValueError(f"mip.entity_lengths: expected ints of shape [*B, O] = {(*batch_shape, O)}, got "
                         f"{lengths.dtype} {lengths.shape}")
    known = _concrete(lengths)
    if known is not None and (known.min() < 1 or known.max() > L - 1):
        raise ValueError(f"mip.entity_lengths: every phrase needs 1 .. L - 1 = {L - 1} tokens after BOS, got "
                         f"values in [{known.min()}, {known.max()}]")
    T, N, H = query.shape[-3:]
    K = entity_key.shape[-2]
    scale = H**-0.5 if scale is None else scale
    qg = query.astype(jnp.float32).reshape(*batch_shape, T, K, N // K, H)
    logits = jnp.einsum("...tkgh,...olkh->...okglt", qg, entity_key.astype(jnp.float32),
                        precision=jax.lax.Precision.HIGHEST) * scale
    maps = jax.nn.softmax(logits, axis=-1).mean(axis=(-4, -3))  # over positions, then the mean over all N heads
    tokens = jnp.arange(L)
    chosen = (tokens >= 1) & (tokens <= lengths[..., None])  # [*B, O, L]
    relevance = jnp.sum(maps * chosen[..., None], axis=-2) / jnp.sum(chosen, axis=-1)[..., None]
    return jax.lax.stop_gradient(relevance)


def object_weights(relevance, text_out, text_weight) -> jax.Array:
    """r_o(t) g^(t) [*B, O, T] from relevance a [*B, O, T], the text attention output before its output projection
    text_out [*B, T, C] and the gate vector text_weight [C] (`text_to_weight`, bias-free)."""
    relevance, text_out, text_weight = jnp.asarray(relevance), jnp.asarray(text_out), jnp.asarray(text_weight)
    if text_out.shape[:-1] != relevance.shape[:-2] + relevance.shape[-1:]:
        raise ValueError(f"mip.text_out: expected [*B, T, C] with [*B] {relevance.shape[:-2]} and T "
                         f"{relevance.shape[-1]} (from relevance {relevance.shape}), got {text_out.shape}")
    if text_weight.shape != text_out.shape[-1:]:
        raise ValueError(f"mip.text_weight: expected [C] = {text_out.shape[-1:]}, got {text_weight.shape}")
    relevance = relevance.astype(jnp.float32)
    normalised = relevance / jnp.sum(relevance, axis=-2, keepdims=True)
    gate = jax.nn.sigmoid(jnp.einsum("...tc,c->...t", text_out.astype(jnp.float32), text_weight.astype(jnp.float32),
                                     precision=jax.lax.Precision.HIGHEST))
    gate = gate / jnp.mean(gate, axis=-1, keepdims=True)
    return normalised * gate[..., None, :]


def mip_object_weights(query, entity_key, entity_lengths, text_out, text_weight, *,
                       scale: float | None = None) -> jax.Array:
    """w [*B, O, T] = r_o(t) g^(t) (module docstring)."""
    return object_weights(entity_relevance(query, entity_key, entity_lengths, scale=scale), text_out, text_weight)


def mip_attention(query, text_key, text_value, object_keys, object_values, entity_key, entity_lengths, text_weight,
                  *, scale: float = 1.0, softmax_scale: float | None = None, reference: bool = False) -> jax.Array:
    """The whole MIP merge before to_out: T + scale * sum_o w_o(t) O_o(t), [*B, T, N, V].

    object_keys / object_values [*B, O, S, K, H|V]: each object's image tokens through to_k_ip / to_v_ip.
    The gate reads T with its heads merged ([*B, T, N * V], the code's batch_to_head_dim order: head-major).
    """
    run = multi_stream_reference if reference else multi_stream_cross_attention
    text = run(query, [(text_key, text_value, 1.0)], scale=softmax_scale)
    weights = mip_object_weights(query, entity_key, entity_lengths, text.reshape(*text.shape[:-2], -1),
                                 text_weight, scale=softmax_scale)
    O = object_keys.shape[-4]
    streams = [(text_key, text_value, 1.0)] + [
        (object_keys[..., o, :, :, :], object_values[..., o, :, :, :], scale * weights[..., o, :]) for o in range(O)]
    return run(query, streams, scale=softmax_scale)
