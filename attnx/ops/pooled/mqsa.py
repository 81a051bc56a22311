"""MQSA: Multi-Query Self-Attention (Zhu, Shi, Zhang, Wu, Mo, Nie, 2024, "Collaboration and Transition: Distilling
Item Transitions into Multi-Query Self-Attention for Sequential Recommendation", WSDM 2024, arXiv 2311.01056, method
section). No official code was found; this follows the spec's reading of the paper (llm_mechanisms.md §13), which
marks the pooling form as unverified (assumed: mean):

    L-query     q^L_t = mean(q_{t-L+1}, ..., q_t)     (the last L items; fewer at the start of the sequence)
    two branches, long L_l and short L_s:   o = alpha * Attn(q^{L_l}, K, V) + (1 - alpha) * Attn(q^{L_s}, K, V)

alpha weighs the long branch (alpha = 1: long only, 0: short only); short_window = 1 makes the short branch plain
self-attention with single-item queries. Pooling the projected queries equals pooling the item embeddings before the
(linear, bias-free) query projection.

What could be checked (2026-11): only the paper's abstract is reachable (arXiv listing, Hugging Face papers and
three mirrors; no full text, no code). It confirms an "L-query self-attention module that employs flexible window
sizes for attention queries" and a "multi-query self-attention" that combines "long and short-query
self-attentions" to balance bias and variance. It does not give the pooling operator (mean is still the spec's
assumption), the form of the combination (a fixed alpha mix is the spec's reading), or the transition-aware
embedding distillation (TED) loss: the abstract says only that TED "distills global item-to-item transition
patterns into item embeddings"; how the transition graph is built, what the teacher is and which divergence is
minimised are not stated, so attnx does not implement that loss (a guessed loss would not be the paper's).

The window always looks back, so pooling is causal and the mechanism keeps every CAB pattern; in cross attention the
window runs over the query sequence. There is no KV-cache decode rule: the pooled query needs the previous queries,
which a KV cache does not hold.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from attnx.ops.builtin import softmax_attention


def _check_window(window, name: str) -> None:
    if not isinstance(window, int) or isinstance(window, bool) or window < 1:
        raise ValueError(f"mqsa.{name}: expected an int >= 1, got {window!r}")


def query_window_pool(query, window: int):
    """query [*B, T, N, H] -> the mean of each position's last `window` queries (itself included), same shape."""
    _check_window(window, "window")
    x = query.astype(jnp.float32)
    axis = x.ndim - 3
    dims = tuple(window if i == axis else 1 for i in range(x.ndim))
    pads = tuple((window - 1, 0) if i == axis else (0, 0) for i in range(x.ndim))
    # A window sum (not a difference of cumulative sums): no cancellation, and row t never reads a later row.
    sums = jax.lax.reduce_window(x, 0.0, jax.lax.add, dims, (1,) * x.ndim, pads)
    counts = jnp.minimum(jnp.arange(1, x.shape[axis] + 1), window).astype(jnp.float32)
    return (sums / counts[:, None, None]).astype(query.dtype)


def mqsa_attention(query, key, value, *, causal: bool = False, long_window: int = 4, short_window: int = 1,
                   alpha: float = 0.5, **kwargs):
    """alpha * Attn(L_long-pooled queries) + (1 - alpha) * Attn(L_short-pooled queries); kwargs go to softmax
    attention (mask, bias, implementation, ...)."""
    _check_window(long_window, "long_window")
    _check_window(short_window, "short_window")
    if not isinstance(alpha, (int, float)) or not 0.0 <= alpha <= 1.0:
        raise ValueError(f"mqsa.alpha: expected a number in [0, 1], got {alpha!r}")
    attend = lambda window: softmax_attention(query_window_pool(query, window), key, value, causal=causal, **kwargs)
    if alpha == 1.0 or long_window == short_window:
        return attend(long_window)
    if alpha == 0.0:
        return attend(short_window)
    return (alpha * attend(long_window) + (1.0 - alpha) * attend(short_window)).astype(query.dtype)


def mqsa_reference(query, key, value, *, causal: bool = False, long_window: int = 4, short_window: int = 1,
                   alpha: float = 0.5, **kwargs):
    """The oracle: explicit per-position window means, reference softmax attention for both branches."""
    t = query.shape[-3]

    def pool(window):
        rows = [jnp.mean(query[..., max(0, i - window + 1):i + 1, :, :], axis=-3) for i in range(t)]
        return jnp.stack(rows, axis=-3)

    attend = lambda window: softmax_attention(pool(window), key, value, causal=causal, implementation="reference",
                                              **kwargs)
    return alpha * attend(long_window) + (1.0 - alpha) * attend(short_window)
