"""Head transforms against visual hallucination (spec diffusion_multimodal_bench.md §7): VHR's head scaling and the
head-specific logit boost of "Fixing Imbalanced Attention". VHR's code is not available here (its per-layer rule
below follows the paper as read through a third-party close reading); "Fixing Imbalanced Attention" has official
code (hasanar1f/PAINT), ported at the end of this file.

**VHR**, Vision-aware Head Reinforcement (He, Zhu, Guo, Fang, Hua, Jia, Tang, Chua, Wang, 2024, "Cracking the Code of
Hallucination in LVLMs with Vision-aware Head Divergence", arXiv 2412.13949, ACL 2025, §3-4). Vision-aware Head
Divergence of head h in layer l is the distance between its output with and without the image in the context,

    VHD_{l,h} = || o_{l,h}(image, text) - o_{l,h}(text) ||_2          (over the head's value axis)

and VHR multiplies, layer by layer, the outputs of the top-K heads by VHD by alpha (= 2) before the output
projection: o_h <- (1 + (alpha - 1) 1[h in TopK_l]) o_h. Computing VHD needs one extra pass without the image; that
pass and the layer-by-layer schedule belong to the model (models/multimodal.py `measure_vhd`, `vhr_plan`, and
`vhr_generate`, which re-selects per generated token, layer by layer), so here
are the per-head scores, the top-K scale and its application. The spec flags the exact top-K rule as unverified against the paper
(e.g. a per-layer K versus a global one); `vhr_head_scale` takes K per call, and `vhr_layer_selection` /
`vhr_layer_scales` implement the paper's per-layer rule (above the layer median, surges above mean + std dropped).

**Head modulation** (Arif, Dip, Hussain, Zhang, Thomas, 2025, "Fixing Imbalanced Attention to Mitigate In-Context
Hallucination of Large Vision-Language Model", arXiv 2501.12206, §3): for the selected tokens S (locally informative
tokens united with those the vision encoder's CLS attends to; chosen by the caller), each head's logits get

    z[h, q, j] += log(1 + alpha * s_h)     for j in S,

with s_h the head's visual sensitivity measured offline; log(1 + .) makes the boost a factor (1 + alpha s_h) on the
unnormalised probability of the selected keys (the registered entry). The official code differs (followed by the
`paint_*` functions below): S_local is the top 25% of the vision encoder's first-layer CLS attention, S_spatial the
IQR outliers of its penultimate-layer CLS attention, and the selected logits are rescaled z + alpha |z| (local,
0.7) / z + beta |z| (spatial, 0.3) on the last query row, the same in every head.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def vhd_scores(out_with_image: jax.Array, out_without_image: jax.Array) -> jax.Array:
    """[*B, T, N, V] head outputs with and without the image -> [*B, T, N] float32 L2 distances over V."""
    if out_with_image.shape != out_without_image.shape:
        raise ValueError(f"vhd_scores: out_with_image {out_with_image.shape} and out_without_image "
                         f"{out_without_image.shape} must have one shape [*B, T, N, V]")
    delta = out_with_image.astype(jnp.float32) - out_without_image.astype(jnp.float32)
    return jnp.sqrt(jnp.sum(jnp.square(delta), axis=-1))


def vhr_head_scale(vhd: jax.Array, top_k: int, alpha: float = 2.0) -> jax.Array:
    """Per-head scale [..., N] = 1 + (alpha - 1) 1[h among the top_k of vhd[..., :]] (float32)."""
    vhd = jnp.asarray(vhd)
    num_heads = vhd.shape[-1]
    if isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)) or not 0 <= top_k <= num_heads:
        raise ValueError(f"vhr.top_k: expected an int in [0, {num_heads}] (the number of heads), got {top_k!r}")
    if top_k == 0:
        return jnp.ones(vhd.shape, jnp.float32)
    _, chosen = jax.lax.top_k(vhd.astype(jnp.float32), int(top_k))
    selected = jnp.sum(jax.nn.one_hot(chosen, num_heads, dtype=jnp.float32), axis=-2)
    return 1.0 + (float(alpha) - 1.0) * selected


def heads_scale(num_heads: int, heads, alpha: float = 2.0) -> jax.Array:
    """[N] scale from an explicit head selection (static tuple of head indices), VHR's rule with K = len(heads)."""
    heads = check_heads("vhr.heads", heads, num_heads)
    scale = np.ones(num_heads, np.float32)
    scale[list(heads)] = alpha
    return jnp.asarray(scale)


def apply_head_scale(out: jax.Array, scale: jax.Array) -> jax.Array:
    """out [*B, T, N, V] times a per-head scale broadcastable to [*B, T, N] (before the output projection)."""
    scale = jnp.asarray(scale)
    try:
        jnp.broadcast_shapes(scale.shape, out.shape[:-1])
    except ValueError:
        raise ValueError(f"vhr.head_scale: shape {scale.shape} does not broadcast to the head outputs "
                         f"[*B, T, N] = {out.shape[:-1]}") from None
    return (out.astype(jnp.float32) * scale[..., None].astype(jnp.float32)).astype(out.dtype)


def head_modulation_bias(selected: jax.Array, head_scores: jax.Array, alpha: float = 1.0) -> jax.Array:
    """Additive logit bias [N, 1, S] (float32): log(1 + alpha s_h) on the selected keys, 0 elsewhere.

    selected [S] bool (the token set S as a key mask), head_scores [N] >= 0 (visual sensitivity per head)."""
    selected = jnp.asarray(selected)
    head_scores = jnp.asarray(head_scores, jnp.float32)
    if selected.ndim != 1 or selected.dtype != jnp.bool_:
        raise ValueError(f"head_modulation.selected: expected a bool [S] key mask, got {selected.dtype}"
                         f"{list(selected.shape)}")
    if head_scores.ndim != 1:
        raise ValueError(f"head_modulation.head_scores: expected [N] per-head scores, got shape {head_scores.shape}")
    if float(alpha) < 0:
        raise ValueError(f"head_modulation.alpha: expected alpha >= 0, got {alpha!r}")
    boost = jnp.log1p(float(alpha) * head_scores)  # [N]
    return jnp.where(selected[None, None, :], boost[:, None, None], 0.0)


def fit_token_mask(name: str, tokens, length: int) -> jax.Array:
    """A run-time token set bool [*B, S'] fitted to the key length S: cut (tokens past the sequence are dropped,
    as for static indices) or padded with False (positions written later, e.g. a prompt-length mask over a KV cache
    of prompt + generated tokens)."""
    tokens = jnp.asarray(tokens)
    if tokens.dtype != jnp.bool_ or tokens.ndim < 1:
        raise ValueError(f"{name}: expected a tuple of token indices or a bool [*B, S] array (one set per sequence), "
                         f"got {tokens.dtype}{list(tokens.shape)}")
    have = tokens.shape[-1]
    if have >= length:
        return tokens[..., :length]
    return jnp.pad(tokens, [(0, 0)] * (tokens.ndim - 1) + [(0, length - have)])


def check_heads(name: str, heads, num_heads: int) -> tuple[int, ...]:
    if not isinstance(heads, (tuple, list)) or not all(
            isinstance(h, (int, np.integer)) and not isinstance(h, bool) for h in heads):
        raise ValueError(f"{name}: expected a tuple of head indices, got {heads!r}")
    bad = [int(h) for h in heads if not 0 <= h < num_heads]
    if bad or len(set(heads)) != len(heads):
        raise ValueError(f"{name}: expected distinct head indices in [0, {num_heads}) (the query heads), got "
                         f"{tuple(heads)!r}")
    return tuple(int(h) for h in heads)


# ---- VHR's per-layer head selection --------------------------------------------------------------------------------
# The paper's rule (§4, VHR algorithm), as far as it can be checked here: the official code (jinghan1he/VHR) is not
# stored and the paper's method section could only be read through a third-party close reading, which states that
# VHR selects *per layer and per generated token* the heads whose VHD is above the layer's median, after discarding
# abnormal surges above the layer's mean + one standard deviation (so the rule is not a fixed top-K). The ordering
# (median over all heads, surges removed afterwards) and the standard deviation (unbiased, torch's default) are
# assumptions; `vhr_head_scale` keeps the fixed top-K rule, so either schedule can be built.

def vhr_layer_selection(vhd: jax.Array) -> jax.Array:
    """bool [..., N]: heads of one layer with VHD above the median over heads and not an abnormal surge
    (VHD <= mean + std over heads). vhd [..., N] (e.g. [*B, T, N]: per sample and token, as VHR re-selects per
    generation step)."""
    vhd = jnp.asarray(vhd, jnp.float32)
    if vhd.ndim == 0 or vhd.shape[-1] < 2:
        raise ValueError(f"vhr.vhd: expected [..., N] per-head scores with N >= 2, got shape {vhd.shape}")
    median = jnp.median(vhd, axis=-1, keepdims=True)
    surge = jnp.mean(vhd, axis=-1, keepdims=True) + jnp.std(vhd, axis=-1, keepdims=True, ddof=1)
    return (vhd > median) & (vhd <= surge)


def vhr_layer_scales(vhd_per_layer: jax.Array, alpha: float = 2.0, top_k: int | None = None) -> jax.Array:
    """Per-layer head scales [L, ..., N] from per-layer VHD [L, ..., N]: each layer selects on its own scores, by
    `vhr_layer_selection` (top_k None, the paper's rule) or by a fixed per-layer top_k (`vhr_head_scale`)."""
    vhd_per_layer = jnp.asarray(vhd_per_layer, jnp.float32)
    if vhd_per_layer.ndim < 2:
        raise ValueError(f"vhr.vhd_per_layer: expected [L, ..., N] (one row of head scores per layer), got shape "
                         f"{vhd_per_layer.shape}")
    if top_k is not None:
        return vhr_head_scale(vhd_per_layer, top_k, alpha)  # top_k over the last axis, each layer separately
    return 1.0 + (float(alpha) - 1.0) * vhr_layer_selection(vhd_per_layer).astype(jnp.float32)


# ---- "Fixing Imbalanced Attention" (PAINT): the code's two token scores and its logit modulation -------------------
# Official code hasanar1f/PAINT: modPAI/llava/model/multimodal_encoder/clip_encoder.py (update_modpai_alpha,
# get_top_ratio) and modPAI/attention.py (llama_new_forward, llama_modify). Where code and paper/spec differ, the code
# is followed:
#  * Local tokens S_local: the vision encoder's FIRST layer, CLS row over the V patch tokens summed over heads, top
#    int(0.25 V). Spatial/summary tokens S_spatial: the PENULTIMATE layer's CLS row summed over heads, the IQR
#    outliers (> Q3 + 1.5 IQR, numpy's linear percentiles). Local tokens that are also summary tokens are dropped.
#  * Modulation: not the spec's log(1 + alpha s_h). The code rescales the pre-softmax logits of the selected keys
#    in place, z <- z + alpha |z| (local, alpha 0.7) and z <- z + beta |z| (summary, beta 0.3 in the code, 0.4 the
#    paper's best), identically for every head (the code has no per-head sensitivity), only in layers
#    [start_layer, end_layer) and only on the last query row (the row producing the next token: every generated
#    token, and the last prompt token at prefill), which `paint_modulate_logits` takes as `rows`.

def _cls_scores(cls_attn, name: str) -> jax.Array:
    cls_attn = jnp.asarray(cls_attn, jnp.float32)
    if cls_attn.ndim != 2:
        raise ValueError(f"{name}: expected the vision encoder's CLS attention row per head [heads, V] over the V "
                         f"patch tokens, got shape {cls_attn.shape}")
    return jnp.sum(cls_attn, axis=0)


def paint_local_tokens(cls_attn_first: jax.Array, ratio: float = 0.25) -> jax.Array:
    """bool [V]: the int(ratio V) patch tokens with the largest head-summed CLS attention in the vision encoder's
    first layer (cls_attn_first [heads, V])."""
    if not 0.0 <= float(ratio) <= 1.0:
        raise ValueError(f"head_modulation.ratio: expected a fraction of the image tokens in [0, 1], got {ratio!r}")
    scores = _cls_scores(cls_attn_first, "head_modulation.cls_attn_first")
    count = int(scores.shape[0] * float(ratio))
    if count == 0:
        return jnp.zeros(scores.shape, bool)
    _, top = jax.lax.top_k(scores, count)
    return jnp.zeros(scores.shape, bool).at[top].set(True)


def paint_summary_tokens(cls_attn_late: jax.Array) -> jax.Array:
    """bool [V]: patch tokens whose head-summed CLS attention in the vision encoder's penultimate layer
    (cls_attn_late [heads, V]) is an upper IQR outlier, > Q3 + 1.5 (Q3 - Q1). The code takes the top-k with k the
    number of such outliers, which is this set."""
    scores = _cls_scores(cls_attn_late, "head_modulation.cls_attn_late")
    q1, q3 = jnp.percentile(scores, 25.0), jnp.percentile(scores, 75.0)
    return scores > q3 + 1.5 * (q3 - q1)


def paint_token_sets(cls_attn_first: jax.Array, cls_attn_late: jax.Array, ratio: float = 0.25):
    """(local, summary) bool [V] image-token sets of the code: local minus summary, and summary."""
    summary = paint_summary_tokens(cls_attn_late)
    return paint_local_tokens(cls_attn_first, ratio) & ~summary, summary


def place_image_tokens(image_tokens: jax.Array, image_start: int, length: int) -> jax.Array:
    """bool [V] over the image -> bool [length] over the sequence (the code's `+ img_start_idx`)."""
    image_tokens = jnp.asarray(image_tokens, bool)
    V = image_tokens.shape[-1]
    if isinstance(image_start, bool) or not isinstance(image_start, (int, np.integer)) or not (
            0 <= image_start and image_start + V <= length):
        raise ValueError(f"head_modulation.image_start: expected an int with the {V} image tokens inside the "
                         f"sequence of length {length}, got {image_start!r}")
    return jnp.zeros(length, bool).at[image_start:image_start + V].set(image_tokens)


def paint_modulate_logits(logits: jax.Array, local: jax.Array, summary: jax.Array, *, alpha: float = 0.7,
                          beta: float = 0.3, rows: jax.Array | None = None) -> jax.Array:
    """The code's modulation of pre-softmax logits [..., T, S]: z + alpha |z| on `local` keys, z + beta |z| on
    `summary` keys (bool [S]; local wins where both are set, which `paint_token_sets` rules out), on the query rows
    where `rows` (bool [T], default all) is True. Masked (non-finite) logits stay as they are."""
    if float(alpha) < 0 or float(beta) < 0:
        raise ValueError(f"head_modulation.alpha/beta: expected factors >= 0, got alpha={alpha!r}, beta={beta!r}")
    logits = jnp.asarray(logits)
    factor = jnp.where(jnp.asarray(local, bool), float(alpha), jnp.where(jnp.asarray(summary, bool), float(beta),
                                                                          0.0))
    if rows is not None:
        factor = jnp.where(jnp.asarray(rows, bool)[:, None], factor, 0.0)  # [T, S]
    finite = jnp.isfinite(logits)
    safe = jnp.where(finite, logits, 0.0)
    return jnp.where(finite, safe + factor * jnp.abs(safe), logits)


def vhr_layer_attention(layer_heads, alpha: float = 2.0) -> tuple[tuple[str, dict], ...]:
    """An `LLMConfig.layer_attention` tuple with one static VHR head selection per layer (layer_heads: a tuple of
    head-index tuples, entry l for layer l, repeated over the depth by the LLM like any layer_attention pattern), e.g.
    the per-layer selections `vhr_layer_selection` made on measured VHD."""
    if not isinstance(layer_heads, (tuple, list)) or not layer_heads or not all(
            isinstance(h, (tuple, list)) for h in layer_heads):
        raise ValueError(f"vhr.layer_heads: expected a non-empty tuple of per-layer head tuples, got {layer_heads!r}")
    return tuple(("vhr", {"heads": tuple(int(h) for h in heads), "alpha": float(alpha)}) for heads in layer_heads)
