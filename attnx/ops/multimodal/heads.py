"""Head transforms against visual hallucination (spec diffusion_multimodal_bench.md §7): VHR's head scaling and the
head-specific logit boost of "Fixing Imbalanced Attention". Neither paper's code is available here; both follow the
paper's equations as the spec states them.

**VHR**, Vision-aware Head Reinforcement (He, Zhu, Guo, Fang, Hua, Jia, Tang, Chua, Wang, 2024, "Cracking the Code of
Hallucination in LVLMs with Vision-aware Head Divergence", arXiv 2412.13949, ACL 2025, §3-4). Vision-aware Head
Divergence of head h in layer l is the distance between its output with and without the image in the context,

    VHD_{l,h} = || o_{l,h}(image, text) - o_{l,h}(text) ||_2          (over the head's value axis)

and VHR multiplies, layer by layer, the outputs of the top-K heads by VHD by alpha (= 2) before the output
projection: o_h <- (1 + (alpha - 1) 1[h in TopK_l]) o_h. Computing VHD needs one extra pass without the image; that
pass and the layer-by-layer schedule belong to the model (the same hook as MoH's gates), so here are the per-head
scores, the top-K scale and its application. The spec flags the exact top-K rule as unverified against the paper
(e.g. a per-layer K versus a global one); `vhr_head_scale` takes K per call, so either schedule can be built on it.

**Head modulation** (Arif, Dip, Hussain, Zhang, Thomas, 2025, "Fixing Imbalanced Attention to Mitigate In-Context
Hallucination of Large Vision-Language Model", arXiv 2501.12206, §3): for the selected tokens S (locally informative
tokens united with those the vision encoder's CLS attends to; chosen by the caller), each head's logits get

    z[h, q, j] += log(1 + alpha * s_h)     for j in S,

with s_h the head's visual sensitivity measured offline; log(1 + .) makes the boost a factor (1 + alpha s_h) on the
unnormalised probability of the selected keys. The spec flags both scoring functions as unverified; they are the
caller's inputs here.
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


def check_heads(name: str, heads, num_heads: int) -> tuple[int, ...]:
    if not isinstance(heads, (tuple, list)) or not all(
            isinstance(h, (int, np.integer)) and not isinstance(h, bool) for h in heads):
        raise ValueError(f"{name}: expected a tuple of head indices, got {heads!r}")
    bad = [int(h) for h in heads if not 0 <= h < num_heads]
    if bad or len(set(heads)) != len(heads):
        raise ValueError(f"{name}: expected distinct head indices in [0, {num_heads}) (the query heads), got "
                         f"{tuple(heads)!r}")
    return tuple(int(h) for h in heads)
