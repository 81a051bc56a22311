"""Landmark Attention (Mohtashami & Jaggi, 2023, "Landmark Attention: Random-Access Infinite Context Length for
Transformers", arXiv 2305.16300, §3 (grouped softmax, eq. 1-2), §3.2 (retrieval at inference), §4).
Official code: epfml/landmark-attention, `lm_benchmark/models/landmark.py` (training),
`lm_benchmark/models/caches/mem_cache.py` (retrieval). Spec: llm_mechanisms.md §4.

A landmark token follows every `block_size` ordinary tokens; its key stands for its block. A query attends to the
tokens of its own block directly and to every earlier block only through that block's landmark: the outer softmax
over {own-block tokens} ∪ {earlier landmarks} gates an inner softmax within each earlier block (reference.py
writes the weights out). Landmark values receive weight 0. At inference the landmark logits select the top-k
blocks per query and head, and only those are attended (retrieval.py).

Entry points:
    landmark_attention(query, key, value, *, block_size, causal=True, ...)     full causal self attention
    landmark_retrieve(query, landmark_key, top_k, ...)                         the block selection alone
    landmark_decode(query, key_cache, value_cache, *, query_positions, ...)    the registry decode rule

Implementations: "chunked" (training fast path, regular spacing, a scan over key blocks; the default),
"gather" (retrieval of top-k blocks, gathered per query and head; the default when top_k is set), "reference"
(dense weights; the only one that takes a general `is_landmark` mask).

Departures from the code: group dropout (`p_group_dropout`, off by default there) is not implemented; the code's
`max_groups_for_softmax` bucket count is not needed (blocks are counted exactly); see retrieval.py for the
rotary "mem_jump" re-positioning of retrieved blocks, which attention on rotated keys cannot do.
"""

from __future__ import annotations

import numpy as np
import jax.numpy as jnp

from attnx.ops.landmark.chunked import landmark_chunked
from attnx.ops.landmark.common import check_block_size, regular_landmarks
from attnx.ops.landmark.reference import landmark_reference, landmark_weights
from attnx.ops.landmark.retrieval import METHODS, retrieval_attention, retrieval_keep, retrieve
from attnx.validation import canonicalize

__all__ = ["IMPLEMENTATIONS", "METHODS", "landmark_attention", "landmark_reference_fn", "landmark_retrieve",
           "landmark_decode", "landmark_weights_of", "regular_landmarks"]

IMPLEMENTATIONS = ("chunked", "gather", "reference")


def _check_top_k(top_k) -> None:
    if top_k is not None and (not isinstance(top_k, (int, np.integer)) or isinstance(top_k, bool) or top_k < 0):
        raise ValueError(f"landmark.top_k: expected None (every earlier block) or an int >= 0, got {top_k!r}")


def _check_method(retrieval) -> None:
    if retrieval not in METHODS:
        raise ValueError(f"landmark.retrieval: {retrieval!r}; allowed: {METHODS}")


def _canonical_is_landmark(is_landmark, batch_shape, S: int):
    m = jnp.asarray(is_landmark)
    if m.dtype != jnp.bool_:
        raise TypeError(f"landmark.is_landmark: expected a bool array [*B, S] or [S], got {m.dtype}")
    if m.ndim == 0 or m.shape[-1] != S:
        raise ValueError(f"landmark.is_landmark: expected shape [*B, S] or [S] with S={S}, got {m.shape}")
    lead = m.shape[:-1]
    if lead and lead != tuple(batch_shape):
        raise ValueError(f"landmark.is_landmark: batch dims {lead} must equal the query's {tuple(batch_shape)} or "
                         f"be absent")
    return m.reshape(-1, S)


def _resolve(implementation, top_k, is_landmark) -> str:
    if implementation is None:
        return "reference" if is_landmark is not None else ("chunked" if top_k is None else "gather")
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"landmark.implementation: {implementation!r}; allowed: {IMPLEMENTATIONS} or None")
    if implementation != "reference" and is_landmark is not None:
        raise NotImplementedError(f"landmark: implementation {implementation!r} handles regular spacing only; a "
                                  f"general is_landmark mask needs implementation='reference' (or None)")
    if implementation == "chunked" and top_k is not None:
        raise NotImplementedError("landmark: implementation 'chunked' is the training path (every earlier block); "
                                  "top-k retrieval needs 'gather' or 'reference'")
    return implementation


def landmark_attention(query, key, value, *, block_size: int = 50, causal: bool = True, is_landmark=None,
                       top_k: int | None = None, retrieval: str = "per_token_and_head", scale: float | None = None,
                       implementation: str | None = None):
    """query [*B, T, N, H], key [*B, S, K, H], value [*B, S, K, V] -> [*B, T, N, V]; K divides N; T == S.

    block_size: ordinary tokens per landmark (the paper's b = 50); position p holds a landmark iff
        (p + 1) % (block_size + 1) == 0, so the caller must place landmark tokens there (train/data/landmark.py).
    causal: must be True: landmark attention is causal self attention (CAB pattern CS only).
    is_landmark: optional bool [*B, S] or [S] for an irregular layout (reference implementation only).
    top_k: None trains/evaluates with every earlier block (the paper's training path); an int attends only the
        top_k blocks retrieved per query and head, every position of the sequence as at inference.
    retrieval: how blocks are ranked: "per_token_and_head" (default), "max_over_heads", "max_over_tokens".
    scale: logit scale, default 1 / sqrt(H).
    """
    args = canonicalize(query, key, value, scale=scale)
    T, S = args.q.shape[1], args.k.shape[1]
    if not causal:
        raise ValueError("landmark: causal=False is not supported: landmark attention is causal self attention "
                         "(CAB pattern CS); landmarks gate only blocks before the query's own")
    if T != S:
        raise ValueError(f"landmark: causal self attention needs query length == key length (pattern CS), got "
                         f"T={T}, S={S}; decode over a cache with landmark_decode")
    check_block_size(block_size)
    _check_top_k(top_k)
    _check_method(retrieval)
    impl = _resolve(implementation, top_k, is_landmark)
    if impl == "reference" and is_landmark is not None and top_k is not None:
        raise NotImplementedError("landmark: top-k retrieval with a general is_landmark mask is not implemented "
                                  "(retrieval scores the last slot of each regular block)")
    q, k, v = args.q, args.k, args.v
    if impl == "chunked":
        out = landmark_chunked(q, k, v, block_size=block_size, scale=args.scale)
    elif impl == "gather":
        out = retrieval_attention(q, k, v, jnp.arange(T), block_size=block_size, top_k=top_k, method=retrieval,
                                  scale=args.scale)
    else:
        if is_landmark is None:
            mask = regular_landmarks(S, block_size)[None]
        else:
            mask = _canonical_is_landmark(is_landmark, args.batch_shape, S)
        keep = None if top_k is None else retrieval_keep(q, k, block_size=block_size, top_k=top_k,
                                                         method=retrieval, scale=args.scale)
        out = landmark_reference(q, k, v, mask, scale=args.scale, keep=keep)
    out = out.astype(args.q.dtype)
    return out.reshape(args.batch_shape + out.shape[1:])


def landmark_reference_fn(query, key, value, **kwargs):
    """The registry's reference: landmark_attention with implementation='reference'."""
    kwargs.pop("implementation", None)
    return landmark_attention(query, key, value, implementation="reference", **kwargs)


def landmark_weights_of(query, key, *, block_size: int = 50, is_landmark=None, top_k: int | None = None,
                        retrieval: str = "per_token_and_head", scale: float | None = None):
    """The dense weights w [*B, T, N, S] of the reference (rows sum to 1, landmark columns 0), for analysis."""
    args = canonicalize(query, key, key, scale=scale)
    S = args.k.shape[1]
    if args.q.shape[1] != S:
        raise ValueError(f"landmark_weights_of: needs T == S, got T={args.q.shape[1]}, S={S}")
    check_block_size(block_size)
    _check_top_k(top_k)
    _check_method(retrieval)
    mask = (regular_landmarks(S, block_size)[None] if is_landmark is None
            else _canonical_is_landmark(is_landmark, args.batch_shape, S))
    keep = None if top_k is None else retrieval_keep(args.q, args.k, block_size=block_size, top_k=top_k,
                                                     method=retrieval, scale=args.scale)
    w = landmark_weights(args.q, args.k, mask, scale=args.scale, keep=keep)
    return w.reshape(args.batch_shape + w.shape[1:])


def landmark_retrieve(query, landmark_key, top_k: int, *, valid=None, retrieval: str = "per_token_and_head",
                      scale: float | None = None):
    """Top-k blocks per query and head by landmark keys (mem_cache.py `retrieve_for_query`).

    query [*B, T, N, H], landmark_key [*B, nb, K, H] (one key per block), valid bool [nb], [T, nb] or
    [*B, T, nb] (the candidate blocks, default all) -> (indices [*B, T, N, top_k] int32, selected [*B, T, N,
    top_k] bool, False where a query had fewer than top_k candidates and the index is filler).
    """
    args = canonicalize(query, landmark_key, landmark_key, scale=scale)
    T, nb = args.q.shape[1], args.k.shape[1]
    _check_top_k(top_k)
    if top_k is None or top_k > nb:
        raise ValueError(f"landmark_retrieve.top_k: expected an int in [0, {nb}] (the number of landmark keys), "
                         f"got {top_k!r}")
    _check_method(retrieval)
    if valid is None:
        valid = jnp.ones((1, T, nb), bool)
    else:
        valid = jnp.asarray(valid)
        if valid.dtype != jnp.bool_ or valid.ndim == 0 or valid.shape[-1] != nb:
            raise ValueError(f"landmark_retrieve.valid: expected bool [nb], [T, nb] or [*B, T, nb] with nb={nb}, "
                             f"got {valid.dtype}{list(valid.shape)}")
        valid = jnp.broadcast_to(valid, args.batch_shape + (T, nb)).reshape(-1, T, nb)
    indices, selected = retrieve(args.q, args.k, top_k, valid=valid, method=retrieval, scale=args.scale)
    shape = args.batch_shape + indices.shape[1:]
    return indices.reshape(shape), selected.reshape(shape)


def landmark_decode(query, key_cache, value_cache, *, query_positions, block_size: int = 50,
                    top_k: int | None = None, retrieval: str = "per_token_and_head", scale: float | None = None,
                    implementation: str | None = None, is_landmark=None):
    """The registry decode rule: queries [*B, T, N, H] at absolute `query_positions` [T] over caches
    [*B, L, K, H] / [*B, L, K, V] whose slot j holds position j; the cache must hold landmark keys at the landmark
    slots. Retrieves top_k blocks per query and head (None: all, equal to the training path's rows) and gathers
    them; `implementation` names the full-sequence call's path and is accepted only so one attention_kwargs dict
    serves both (decoding always gathers)."""
    if is_landmark is not None:
        raise NotImplementedError("landmark_decode: a general is_landmark layout has no decode rule; use the "
                                  "regular spacing of block_size")
    if implementation is not None and implementation not in IMPLEMENTATIONS:
        raise ValueError(f"landmark.implementation: {implementation!r}; allowed: {IMPLEMENTATIONS} or None")
    args = canonicalize(query, key_cache, value_cache, scale=scale)
    check_block_size(block_size)
    _check_top_k(top_k)
    _check_method(retrieval)
    positions = jnp.asarray(query_positions)
    if positions.shape != (args.q.shape[1],):
        raise ValueError(f"landmark_decode.query_positions: expected shape [T] = [{args.q.shape[1]}], got "
                         f"{positions.shape}")
    out = retrieval_attention(args.q, args.k, args.v, positions, block_size=block_size, top_k=top_k,
                              method=retrieval, scale=args.scale).astype(args.q.dtype)
    return out.reshape(args.batch_shape + out.shape[1:])
