"""Drop-ins for code written against `jax.nn.dot_product_attention` and Flax's `attention_fn` hook.

    from attnx.compat import dot_product_attention          # instead of jax.nn.dot_product_attention
    nnx.MultiHeadAttention(..., attention_fn=attnx.compat.flax_attention_fn)

Both translate their arguments into an `attnx.Mask` and call `attnx.dot_product_attention`, so every attnx
implementation (and `implementation=None`, the fastest one for the backend) is available with the familiar
signature. One deliberate difference from jax.nn: a query row with no visible key returns 0, where jax.nn's XLA
path returns the mean of the values (and its padded query rows are zeroed only via `query_seq_lengths`).
"""

from __future__ import annotations

import jax.numpy as jnp

from attnx.api import dot_product_attention as _attention
from attnx.api import dot_product_attention_with_lse as _attention_with_lse
from attnx.mask import Mask

__all__ = ["dot_product_attention", "flax_attention_fn"]


def dot_product_attention(query, key, value, bias=None, mask=None, *, scale=None, is_causal=False,
                          query_seq_lengths=None, key_value_seq_lengths=None, local_window_size=None,
                          implementation=None, return_residual=False):
    """`jax.nn.dot_product_attention`'s exact signature, running on attnx.

    `mask` is a boolean array broadcastable to [B, N, T, S] (True = attend); `local_window_size` an int or
    (left, right); `return_residual=True` also returns the log-sum-exp [B, T, N]. Unlike jax.nn, rank-3 inputs
    [T, N, H] and extra leading batch dims are both accepted.
    """
    if isinstance(local_window_size, int) and not isinstance(local_window_size, bool):
        local_window_size = (local_window_size, local_window_size)
    m = Mask(causal=bool(is_causal), window=local_window_size, q_lengths=query_seq_lengths,
             kv_lengths=key_value_seq_lengths, dense=mask)
    fn = _attention_with_lse if return_residual else _attention
    return fn(query, key, value, bias, m, scale=scale, implementation=implementation)


def flax_attention_fn(query, key, value, bias=None, mask=None, broadcast_dropout=True, dropout_rng=None,
                      dropout_rate=0.0, deterministic=False, dtype=None, precision=None, module=None,
                      promote_dtype=None, is_causal=False, implementation=None):
    """Flax's `attention_fn` signature (`flax.nnx.dot_product_attention`) running on attnx.

    Layout [*B, T, N, H] as in Flax. Attention dropout is not implemented in attnx: a non-zero `dropout_rate`
    with `deterministic=False` raises NotImplementedError instead of being ignored. `module` (used by Flax to
    sow attention weights) must be None: Flax passes a module only when `sow_weights=True`, and attnx does not
    materialise the weights, so that raises NotImplementedError rather than silently recording nothing.
    `precision` is not used: each attnx implementation fixes its own (the reference runs at HIGHEST).
    """
    if module is not None:
        raise NotImplementedError("flax_attention_fn: sowing attention weights (sow_weights=True) is not supported "
                                  "by attnx; use attnx's reference implementation with a probability hook instead, "
                                  "or sow_weights=False")
    if dropout_rate and not deterministic:
        raise NotImplementedError(f"flax_attention_fn: attention dropout (dropout_rate={dropout_rate}) is not "
                                  "implemented in attnx; set dropout_rate=0.0 or deterministic=True")
    if dtype is not None:
        query, key, value = (jnp.asarray(x, dtype) for x in (query, key, value))
    if mask is not None:
        mask = jnp.asarray(mask).astype(bool)  # Flax masks are often float 0/1 (e.g. nnx.make_causal_mask)
    m = Mask(causal=bool(is_causal), dense=mask) if (mask is not None or is_causal) else None
    out = _attention(query, key, value, bias, m, implementation=implementation)
    return out
