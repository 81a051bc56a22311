"""Structured cross attention (Feng, He, Fu, Jampani, Akula, Narayana, Basu, Wang, Wang, 2023, "Training-Free
Structured Diffusion Guidance for Compositional Text-to-Image Synthesis", ICLR 2023, arXiv 2212.05032, §3 (section
numbers not checked); official code weixi-feng/Structured-Diffusion-Guidance,
structured_stable_diffusion/modules/attention.py `CrossAttention.multi_qkv`).

Every noun phrase of the prompt is encoded on its own and spliced back into a copy of the prompt's embedding at the
phrase's span (`align_seq`), so all encodings have the prompt's length S. Projected by the layer's W_K / W_V they
give key sets K_1..K_M and value sets V_1..V_M' ([M, *B, S, K, H] and [M', *B, S, K, V] here). The output, read off
`multi_qkv`:

    M == M':            O = (1/M)      sum_i       softmax(Q K_i^T / sqrt(H)) V_i        (paired)
    M == 1 or M' == 1:  O = (1/(M M')) sum_i sum_j softmax(Q K_i^T / sqrt(H)) V_j        (all pairs)

The paper's two modes are the second line: the default ("structured") mode keeps the full prompt's keys (M = 1) and
averages over the values V_p, V_1..V_k (eq. of §3.3: one attention map, k + 1 value sets); the conjunction mode
(prompts joined by "and", each encoded separately) has keys {K_p, K_1..K_k} and one value set. In the code
(scripts/txt2img_demo.py) that value set is not the prompt's V_p but the prompt embedding with *every* phrase spliced
in at once (`align_sequence(..., single=True)`); the spec's "V" leaves this open, so here the caller passes that
single-aligned value as `value`. The code applies this
to the conditional half of the classifier-free-guidance batch only (the unconditional half is plain attention);
that split is the caller's: these functions see the conditional batch.

Fast path: with one key set the attention map is shared, so by linearity O = softmax(Q K^T) mean_j V_j (one core
call); otherwise one attnx softmax call per pair. The reference forms every map explicitly (`naive_attention`).
"""

from __future__ import annotations

import jax.numpy as jnp

from attnx.ops.builtin import softmax_attention
from attnx.ops.control import naive_attention
from attnx.validation import refuse_self_and_causal

MODES = ("default", "conjunction")


def _check_sets(query, keys, values) -> None:
    if keys.ndim != query.ndim + 1 or values.ndim != query.ndim + 1:
        raise ValueError(f"structured_cross: keys / values must be stacked sets [M, *B, S, K, H] / [M', *B, S, K, V] "
                         f"(rank {query.ndim + 1} for query rank {query.ndim}), got keys {keys.shape} and values "
                         f"{values.shape}")
    M, Mv = keys.shape[0], values.shape[0]
    if M < 1 or Mv < 1 or (M != Mv and M != 1 and Mv != 1):
        raise ValueError(f"structured_cross: M={M} key sets and M'={Mv} value sets; allowed: M == M' (paired) or "
                         f"one of them 1 (every pair), as in the official multi_qkv")
    if keys.shape[1:-1] != values.shape[1:-1]:
        raise ValueError(f"structured_cross: key sets {keys.shape} and value sets {values.shape} must agree on "
                         f"[*B, S, K]")


def structured_cross_attention(query, keys, values, *, implementation=None, **kwargs):
    """O for query [*B, T, N, H], keys [M, *B, S, K, H], values [M', *B, S, K, V] -> [*B, T, N, V] (see the module
    docstring for the pairing rule). kwargs go to attnx's softmax core (scale, a key mask, ...)."""
    _check_sets(query, keys, values)
    M, Mv = keys.shape[0], values.shape[0]
    core = lambda k, v: softmax_attention(query, k, v, implementation=implementation, **kwargs)  # noqa: E731
    if M == 1:
        # one attention map for every value set: average the values first (exact by linearity)
        return core(keys[0], jnp.mean(values.astype(jnp.float32), axis=0).astype(values.dtype))
    pairs = [(keys[i], values[i if Mv == M else 0]) for i in range(M)]
    out = sum(core(k, v).astype(jnp.float32) for k, v in pairs) / M
    return out.astype(query.dtype)


def structured_cross_attention_reference(query, keys, values, **kwargs):
    """Every pair's map formed explicitly, summed and divided as in `multi_qkv`."""
    _check_sets(query, keys, values)
    if kwargs:
        raise ValueError(f"structured_cross: the reference takes no core options, got {sorted(kwargs)}")
    M, Mv = keys.shape[0], values.shape[0]
    if M == Mv:
        outs = [naive_attention(query, keys[i], values[i]) for i in range(M)]
    else:
        outs = [naive_attention(query, keys[i], values[j]) for i in range(M) for j in range(Mv)]
    return (sum(outs) / len(outs)).astype(query.dtype)


def _stack(query, key, value, causal, mode, extra_keys, extra_values):
    refuse_self_and_causal("structured_cross", query, key, causal, queries="image tokens", keys="prompt tokens")
    if mode not in MODES:
        raise ValueError(f"structured_cross.mode: {mode!r}; allowed: {MODES}")
    if mode == "default":
        if extra_keys is not None:
            raise ValueError("structured_cross.extra_keys: the default mode keeps the full prompt's keys; give "
                             "extra_values (the noun-phrase encodings' values) or use mode='conjunction'")
        keys = key[None]
        values = value[None] if extra_values is None else jnp.concatenate([value[None], extra_values], axis=0)
    else:
        if extra_values is not None:
            raise ValueError("structured_cross.extra_values: the conjunction mode has one value set; give "
                             "extra_keys (the separately encoded prompts' keys) or use mode='default'")
        keys = key[None] if extra_keys is None else jnp.concatenate([key[None], extra_keys], axis=0)
        values = value[None]
    return keys, values


def structured_cross(query, key, value, *, causal: bool = False, mode: str = "default", extra_keys=None,
                     extra_values=None, **kwargs):
    """Registry form: `key` / `value` are the full prompt's (K_p, V_p); mode='default' adds the noun-phrase value
    sets `extra_values` [k, *B, S, K, V] (O = mean over {V_p, V_1..V_k} under the prompt's map); mode='conjunction'
    adds the separately encoded prompts' key sets `extra_keys` [k, *B, S, K, H] (O = mean over maps of
    {K_p, K_1..K_k} applied to `value`, which the official code builds with every phrase spliced in). With no
    extras both modes are plain softmax cross attention."""
    keys, values = _stack(query, key, value, causal, mode, extra_keys, extra_values)
    return structured_cross_attention(query, keys, values, **kwargs)


def structured_cross_reference(query, key, value, *, causal: bool = False, mode: str = "default", extra_keys=None,
                               extra_values=None, **kwargs):
    keys, values = _stack(query, key, value, causal, mode, extra_keys, extra_values)
    return structured_cross_attention_reference(query, keys, values, **kwargs)
