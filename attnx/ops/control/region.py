"""Region-constrained cross attention, RCA (Yibin Wang, Weizhong Zhang, Jianwei Zheng, Cheng Jin, 2024,
"PrimeComposer: Faster Progressively Combined Diffusion for Image Composition with Attention Steering", ACM MM 2024,
arXiv 2403.05053, §3, region-constrained cross-attention; section number not checked against the paper).

The released code (CodeGoat24/PrimeComposer) does not contain RCA, so this follows the paper (spec
diffusion_multimodal_bench.md §8, marked [R]): the cross-attention logit of pixel p on a subject word j is set to
-inf when p lies outside the subject's foreground mask M,

    z[p, j] = -inf   if j is a subject token and M[p] = 0,        O = softmax(z) V,

so the subject's words only paint inside its region while every other token (BOS, style words, padding) stays
visible everywhere. The mask is given per query token in the layer's token order (row-major latent pixels); the
paper's latent-resolution downsampling of M is the caller's. A pixel whose every key is a subject token (no other
text token at all) has no allowed key and returns 0, as attnx's core does for fully masked rows.

Only the RCA logit mask is here; the paper's self-attention steering (replacing the generator's maps by the
Correlation Diffuser's for foreground queries within a step window) edits probabilities and belongs to a sampler.
"""

from __future__ import annotations

import jax.numpy as jnp

from attnx.mask import Mask
from attnx.ops.builtin import softmax_attention
from attnx.ops.control import naive_attention
from attnx.validation import refuse_self_and_causal


def region_logit_mask(foreground, subject_tokens) -> jnp.ndarray:
    """allowed [*B, T, S] (True = keep the logit) from foreground [*B, T] (True = query pixel inside the subject's
    region) and subject_tokens [*B, S] (True = key is one of the subject's words); either may omit batch axes."""
    foreground = jnp.asarray(foreground)
    subject_tokens = jnp.asarray(subject_tokens)
    for name, a in (("foreground", foreground), ("subject_tokens", subject_tokens)):
        if a.dtype != jnp.bool_ or a.ndim < 1:
            raise ValueError(f"region_mask.{name}: expected a bool array [*B, T] / [*B, S], got dtype {a.dtype} "
                             f"shape {a.shape}")
    return foreground[..., :, None] | ~subject_tokens[..., None, :]


def _allowed(query, key, causal, foreground, subject_tokens):
    refuse_self_and_causal("region_mask", query, key, causal, queries="image tokens", keys="prompt tokens")
    T, S = query.shape[-3], key.shape[-3]
    if (foreground is None) != (subject_tokens is None):
        raise ValueError("region_mask.foreground / region_mask.subject_tokens: give both (the mask is defined by "
                         "the pair) or neither (plain cross attention)")
    if foreground is None:
        return None
    if jnp.shape(foreground)[-1] != T or jnp.shape(subject_tokens)[-1] != S:
        raise ValueError(f"region_mask: foreground {jnp.shape(foreground)} must end in T={T} and subject_tokens "
                         f"{jnp.shape(subject_tokens)} in S={S}")
    return region_logit_mask(foreground, subject_tokens)


def region_mask_attention(query, key, value, *, causal: bool = False, foreground=None, subject_tokens=None,
                          **kwargs):
    """RCA for query [*B, T, N, H] (image tokens) over key [*B, S, K, H] / value [*B, S, K, V] (prompt tokens) ->
    [*B, T, N, V]. foreground [*B, T] and subject_tokens [*B, S] (bool) define the mask; without them it is plain
    softmax cross attention. kwargs go to attnx's softmax core (scale, implementation, ...)."""
    allowed = _allowed(query, key, causal, foreground, subject_tokens)
    mask = None if allowed is None else Mask(dense=allowed[..., None, :, :])  # head axis of [*B, N, T, S]
    return softmax_attention(query, key, value, mask=mask, **kwargs)


def region_mask_reference(query, key, value, *, causal: bool = False, foreground=None, subject_tokens=None):
    allowed = _allowed(query, key, causal, foreground, subject_tokens)
    return naive_attention(query, key, value, allowed).astype(query.dtype)
