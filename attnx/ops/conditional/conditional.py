"""Conditional cross attention (Song, Hwang, Yoon, Choi, Gu, 2023, "Conditional Cross Attention Network for
Multi-Space Embedding without Entanglement in Only a SINGLE Network", ICCV 2023, arXiv 2307.13254, §3).

No official code was found, and only the abstract and introduction of the paper could be read here; the form below is
the spec's reading (vision_mechanisms.md §9, marked unverified). Assumptions, stated so they can be checked against
the paper's §3:

- An attribute condition c in {0, ..., C-1} is embedded one-hot -> linear (no bias), i.e. a row of a learned table
  `condition_table` [C, D], giving one condition token t_c per requested attribute.
- In the final block, the condition token is the *query* and the image tokens X (patch tokens with their position
  embeddings already added by the backbone) are the *keys and values*, multi-head:

      e_c = W_O concat_h softmax((t_c W_Q^h)(X W_K^h)^T / sqrt(d)) (X W_V^h)

  one embedding per condition (trained with a per-attribute triplet loss, outside this function).
- Several conditions of one image are independent queries over the same keys and values, so asking for C conditions
  at once equals C separate calls.

The registry entry `conditional_cross(query, key, value)` is the attention core of that formula: condition queries
[*B, T conditions, N, H] over image keys/values [*B, S, K, H] (non-causal cross attention, CAB "NC" only). It refuses
causal=True (image tokens have no order the conditions could respect) and T == S (equal lengths read as self
attention, which the mechanism does not define: a ViT layer could otherwise pick it as a token mixer and silently run
plain softmax self attention). The whole mechanism with weights, `conditional_cross_attention`, has no length rule.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from attnx.ops.builtin import softmax_attention
from attnx.validation import refuse_self_and_causal

HIGHEST = jax.lax.Precision.HIGHEST


def _check_pattern(query, key, causal: bool) -> None:
    refuse_self_and_causal("conditional_cross", query, key, causal, queries="condition tokens", keys="image tokens",
                           self_attention_hint="use 'softmax', or call conditional_cross_attention with the weights")


def conditional_cross(query, key, value, *, causal: bool = False, **kwargs):
    """Condition queries [*B, T, N, H] over image keys [*B, S, K, H] / values [*B, S, K, V] -> [*B, T, N, V];
    kwargs go to softmax attention (scale, implementation, a key mask, ...)."""
    _check_pattern(query, key, causal)
    return softmax_attention(query, key, value, **kwargs)


def conditional_cross_reference(query, key, value, *, causal: bool = False, **kwargs):
    _check_pattern(query, key, causal)
    return softmax_attention(query, key, value, implementation="reference", **kwargs)


def condition_tokens(condition_ids, condition_table):
    """Condition tokens [*B, C, D] (or [*B, D]) for integer ids [*B, C] (or [*B]): one-hot times the table [C, D],
    i.e. the table's rows."""
    if not jnp.issubdtype(jnp.asarray(condition_ids).dtype, jnp.integer):
        raise ValueError(f"conditional_cross.condition_ids: expected integer attribute ids, got dtype "
                         f"{jnp.asarray(condition_ids).dtype}")
    return jnp.take(condition_table, condition_ids, axis=0)


def conditional_cross_attention(tokens, condition_ids, *, condition_table, query_weight, key_weight, value_weight,
                                out_weight, **kwargs):
    """Per-condition image embeddings (module docstring).

    tokens [*B, P, D] (image tokens, positions included); condition_ids [*B] or [*B, C] ints; condition_table
    [num_conditions, D]; query_weight [D, N, H], key_weight [D, N, H], value_weight [D, N, V], out_weight [N, V, D].
    Returns [*B, D] for ids [*B], [*B, C, D] for ids [*B, C]. kwargs go to softmax attention.
    """
    condition_ids = jnp.asarray(condition_ids)
    batch = tokens.shape[:-2]
    single = condition_ids.shape == batch
    if not single and condition_ids.shape[:-1] != batch:
        raise ValueError(f"conditional_cross.condition_ids: expected shape [*B] = {batch} or [*B, C], got "
                         f"{condition_ids.shape}")
    if tokens.shape[-1] != condition_table.shape[-1] or condition_table.ndim != 2:
        raise ValueError(f"conditional_cross.condition_table: expected [num_conditions, D={tokens.shape[-1]}], got "
                         f"{condition_table.shape}")
    ids = condition_ids[..., None] if single else condition_ids
    conditions = condition_tokens(ids, condition_table).astype(tokens.dtype)  # [*B, C, D]
    query = jnp.einsum("...cd,dnh->...cnh", conditions, query_weight, precision=HIGHEST)
    key = jnp.einsum("...pd,dnh->...pnh", tokens, key_weight, precision=HIGHEST)
    value = jnp.einsum("...pd,dnv->...pnv", tokens, value_weight, precision=HIGHEST)
    mixed = softmax_attention(query, key, value, **kwargs)  # [*B, C, N, V]
    out = jnp.einsum("...cnv,nvd->...cd", mixed, out_weight, precision=HIGHEST)
    return out[..., 0, :] if single else out
