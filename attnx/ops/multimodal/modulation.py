"""The registered `head_modulation` entry ("Fixing Imbalanced Attention to Mitigate In-Context Hallucination of Large
Vision-Language Model", Arif, Dip, Hussain, Zhang, Thomas, 2025, arXiv 2501.12206, §3; official code
hasanar1f/PAINT) in two modes:

* mode='bias' (default): the spec's head-specific boost log(1 + alpha s_h) on the selected tokens, an additive
  logit bias, so every implementation (chunked, Pallas) runs it (attention.head_modulation_attention).
* mode='code': the official code's modulation (heads.paint_modulate_logits): on query rows at positions >=
  `from_position`, logits of the local tokens become z + alpha |z| (alpha 0.7) and of the summary tokens
  z + beta |z| (beta 0.3), the same in every head. The code applies it to the last query row, i.e. to every
  generated token and to the last prompt token at prefill: from_position = prompt length - 1 reproduces that and
  keeps the rule causal (the default 0 modulates every row). The token sets come from the vision encoder's CLS
  attention (heads.paint_token_sets, placed in the sequence by heads.place_image_tokens) and are given here as
  static index tuples, or as bool [*B, S] arrays: per-sequence sets passed at run time (models/multimodal.py
  `paint_token_masks` computes them from a ViT's CLS attention and `run_llm` threads them to the layers). z + alpha |z| depends on z itself, so it is no additive bias: this mode materialises the
  [T, S] logits (implementation 'reference' only, O(T S) memory).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from attnx.ops.multimodal import attention as mm
from attnx.ops.multimodal import heads as head_ops
from attnx.validation import canonicalize

HIGHEST = "highest"
MODES = ("bias", "code")


def _token_mask(name: str, tokens, length: int) -> jnp.ndarray:
    """Static index tuple -> bool [S]; a bool [*B, S'] array (per-sequence sets, e.g. from a vision encoder's CLS
    attention at run time: models/multimodal.py, `LLM(..., attention_inputs=...)`) is cut or padded to S."""
    if not isinstance(tokens, (tuple, list)):  # cut or padded with False to the key length
        return head_ops.fit_token_mask(f"head_modulation.{name}", tokens, length)
    if not all(isinstance(i, (int, np.integer)) and not isinstance(i, bool) and i >= 0 for i in tokens):
        raise ValueError(f"head_modulation.{name}: expected a tuple of token indices >= 0, got {tokens!r}")
    mask = np.zeros(length, bool)
    mask[[i for i in tokens if i < length]] = True  # tokens past the sequence (a shorter prefix) are dropped
    return jnp.asarray(mask)


def _logit_mask(mask, batch_shape) -> jnp.ndarray:
    """bool [S] or [*B, S] -> broadcastable to the logits [B, K, G, T, S] of the canonical single batch axis."""
    if mask.ndim == 1:
        return mask
    mask = jnp.broadcast_to(mask, batch_shape + mask.shape[-1:]).reshape(-1, mask.shape[-1])
    return mask[:, None, None, None, :]


def _code_softmax(query, key, value, allowed, positions, local_tokens, summary_tokens, alpha, beta, from_position,
                  scale):
    if isinstance(from_position, bool) or not isinstance(from_position, (int, np.integer)) or from_position < 0:
        raise ValueError(f"head_modulation.from_position: expected an int >= 0 (first modulated query position), "
                         f"got {from_position!r}")
    args = canonicalize(query, key, value)
    q, k, v = args.q, args.k, args.v
    B, T, N, H = q.shape
    S, K = k.shape[1], k.shape[2]
    scale = H ** -0.5 if scale is None else scale
    qg = q.astype(jnp.float32).reshape(B, T, K, N // K, H)
    logits = jnp.einsum("btkgh,bskh->bkgts", qg, k.astype(jnp.float32), precision=HIGHEST) * scale
    local = _logit_mask(_token_mask("local_tokens", local_tokens, S), args.batch_shape)
    summary = _logit_mask(_token_mask("summary_tokens", summary_tokens, S), args.batch_shape)
    logits = head_ops.paint_modulate_logits(logits, local, summary, alpha=alpha, beta=beta,
                                            rows=positions >= from_position)
    # masked entries never become -inf (double where), so no inf * 0 reaches the gradient; the max is a constant
    m = jax.lax.stop_gradient(jnp.max(jnp.where(allowed, logits, -jnp.inf), axis=-1, keepdims=True))
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    e = jnp.where(allowed, jnp.exp(jnp.where(allowed, logits, m) - m), 0.0)
    denom = jnp.sum(e, axis=-1, keepdims=True)
    probs = e / jnp.where(denom > 0, denom, 1.0)
    out = jnp.einsum("bkgts,bskv->btkgv", probs, v.astype(jnp.float32), precision=HIGHEST)
    return out.reshape(args.batch_shape + (T, N, v.shape[-1])).astype(query.dtype)


def _check_mode(mode, implementation):
    if mode not in MODES:
        raise ValueError(f"head_modulation.mode: expected one of {MODES}, got {mode!r}")
    if mode == "code" and implementation not in (None, "reference"):
        raise NotImplementedError(f"head_modulation: mode='code' rescales logits by their own magnitude, which only "
                                  f"the materialised 'reference' path does, got implementation={implementation!r}")


def _bias_kwargs(kwargs: dict, implementation, scale) -> dict:
    """Mode 'bias' forwards to the multimodal boost: only the options the caller set, so its defaults apply."""
    extra = dict(kwargs, implementation=implementation) if implementation is not None else dict(kwargs)
    if scale is not None:
        extra["scale"] = scale
    return extra


def head_modulation_attention(query, key, value, *, causal: bool = False, mode: str = "bias", alpha=None,
                              local_tokens=(), summary_tokens=(), beta: float = 0.3, from_position: int = 0,
                              scale: float | None = None, implementation=None, **kwargs):
    """Causal self attention with the head_modulation boost: mode 'bias' (tokens, heads, head_scores, alpha = 1)
    or mode 'code' (local_tokens, summary_tokens, alpha = 0.7, beta, from_position); see the module docstring."""
    _check_mode(mode, implementation)
    if mode == "bias":
        extra = _bias_kwargs(kwargs, implementation, scale)
        return mm.head_modulation_attention(query, key, value, causal=causal,
                                            alpha=1.0 if alpha is None else alpha, **extra)
    mm._check_self_causal("head_modulation", query, key, causal)
    if kwargs:
        raise ValueError(f"head_modulation: mode='code' takes local_tokens, summary_tokens, alpha, beta, "
                         f"from_position and scale, got {sorted(kwargs)}")
    T = query.shape[-3]
    allowed = jnp.tril(jnp.ones((T, T), bool))
    return _code_softmax(query, key, value, allowed, jnp.arange(T), local_tokens, summary_tokens,
                         0.7 if alpha is None else alpha, beta, from_position, scale)


def head_modulation_decode(query, key_cache, value_cache, *, query_positions, mode: str = "bias", alpha=None,
                           local_tokens=(), summary_tokens=(), beta: float = 0.3, from_position: int = 0,
                           scale: float | None = None, implementation=None, **kwargs):
    _check_mode(mode, implementation)
    if mode == "bias":
        extra = _bias_kwargs(kwargs, implementation, scale)
        return mm.head_modulation_decode(query, key_cache, value_cache, query_positions=query_positions,
                                         alpha=1.0 if alpha is None else alpha, **extra)
    if kwargs:
        raise ValueError(f"head_modulation: mode='code' takes local_tokens, summary_tokens, alpha, beta, "
                         f"from_position and scale, got {sorted(kwargs)}")
    positions = jnp.asarray(query_positions)
    allowed = jnp.arange(key_cache.shape[-3])[None, :] <= positions[:, None]
    return _code_softmax(query, key_cache, value_cache, allowed, positions, local_tokens, summary_tokens,
                         0.7 if alpha is None else alpha, beta, from_position, scale)
