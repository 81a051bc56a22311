"""Isolation and reposition attention (IR-Diffusion: "Improving Multi-Subject Consistency in Open-Domain Image
Generation with Isolation and Reposition Attention", 2024, arXiv 2411.19261, §3, Isolation Attention and
Reposition Attention; authors and section numbers not checked here, the paper could not be read).

No official code was released; this follows the spec's reading of the paper (diffusion_multimodal_bench.md §8,
marked [R]). The target image's self attention is extended with the reference image's keys/values
(keys = [reference tokens; target tokens]). Every token carries a subject id (0 = background, i >= 1 = subject i, the
same i for the same subject in the reference and the target). Isolation: a query of subject i may only attend to
keys of subject i (reference and target) and, by default, to background keys, so several reference subjects do not
blend into one target subject:

    allowed[t, s] = (id_q[t] == id_k[s])  or  (subjects_see_background and id_k[s] == 0)   for id_q[t] >= 1,
    allowed[t, s] = background_sees_all or id_k[s] == 0                                       for id_q[t] == 0.

With subjects_see_background=False and background_sees_all=False the mask is exactly id_q == id_k: block-diagonal
once tokens are sorted by id. The paper restricts subject queries only, so background queries see every key by
default (an assumption where the paper is silent).

Reposition: the reference subject's box is cropped from the reference feature map, resized (bilinear) to the
target box and pasted there before the reference K/V are formed, so that the subject's reference features sit where
the target subject is. Boxes are static Python ints (y0, x0, y1, x1), end-exclusive, in feature-map pixels.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from attnx.mask import Mask
from attnx.ops.builtin import softmax_attention
from attnx.ops.control import naive_attention


def isolation_mask(q_ids, k_ids, *, subjects_see_background: bool = True, background_sees_all: bool = True):
    """allowed [*B, T, S] from integer subject ids q_ids [*B, T] and k_ids [*B, S] (0 = background)."""
    q_ids, k_ids = jnp.asarray(q_ids), jnp.asarray(k_ids)
    for name, a in (("q_ids", q_ids), ("k_ids", k_ids)):
        if not jnp.issubdtype(a.dtype, jnp.integer) or a.ndim < 1:
            raise ValueError(f"isolation.{name}: expected integer subject ids [*B, length] (0 = background), got "
                             f"dtype {a.dtype} shape {a.shape}")
    q, k = q_ids[..., :, None], k_ids[..., None, :]
    subject_rows = (q == k) | (subjects_see_background & (k == 0))
    background_rows = jnp.full_like(subject_rows, True) if background_sees_all else (k == 0)
    return jnp.where(q == 0, background_rows, subject_rows)


def _allowed(query, key, causal, q_ids, k_ids, subjects_see_background, background_sees_all):
    if causal:
        raise ValueError("isolation: causal=True is not supported: image tokens have no order (non-causal self "
                         "attention extended with reference tokens, patterns NS and NC)")
    if (q_ids is None) != (k_ids is None):
        raise ValueError("isolation.q_ids / isolation.k_ids: give both or neither (neither = every token is "
                         "background = plain attention)")
    if q_ids is None:
        return None
    T, S = query.shape[-3], key.shape[-3]
    if jnp.shape(q_ids)[-1] != T or jnp.shape(k_ids)[-1] != S:
        raise ValueError(f"isolation: q_ids {jnp.shape(q_ids)} must end in T={T} and k_ids {jnp.shape(k_ids)} in "
                         f"S={S}")
    return isolation_mask(q_ids, k_ids, subjects_see_background=subjects_see_background,
                          background_sees_all=background_sees_all)


def isolation_attention(query, key, value, *, causal: bool = False, q_ids=None, k_ids=None,
                        subjects_see_background: bool = True, background_sees_all: bool = True, **kwargs):
    """Target queries [*B, T, N, H] over [reference; target] keys [*B, S, K, H] / values [*B, S, K, V] under the
    isolation mask (plain attention without ids). kwargs go to attnx's softmax core."""
    allowed = _allowed(query, key, causal, q_ids, k_ids, subjects_see_background, background_sees_all)
    mask = None if allowed is None else Mask(dense=allowed[..., None, :, :])
    return softmax_attention(query, key, value, mask=mask, **kwargs)


def isolation_reference(query, key, value, *, causal: bool = False, q_ids=None, k_ids=None,
                        subjects_see_background: bool = True, background_sees_all: bool = True):
    allowed = _allowed(query, key, causal, q_ids, k_ids, subjects_see_background, background_sees_all)
    return naive_attention(query, key, value, allowed).astype(query.dtype)


def _check_box(name, box, h, w):
    if (not isinstance(box, (tuple, list)) or len(box) != 4
            or not all(isinstance(b, int) and not isinstance(b, bool) for b in box)):
        raise ValueError(f"reposition.{name}: expected static ints (y0, x0, y1, x1), got {box!r}")
    y0, x0, y1, x1 = box
    if not (0 <= y0 < y1 <= h and 0 <= x0 < x1 <= w):
        raise ValueError(f"reposition.{name}: {box!r} must satisfy 0 <= y0 < y1 <= {h} and 0 <= x0 < x1 <= {w}")
    return y0, x0, y1, x1


def reposition(feat, box_src, box_dst):
    """feat [*B, h, w, C] with the box_src crop resized (bilinear, half-pixel centres) to box_dst's size and pasted
    into box_dst; the rest of the map is unchanged. Equal-size boxes move the crop exactly."""
    h, w = feat.shape[-3], feat.shape[-2]
    sy0, sx0, sy1, sx1 = _check_box("box_src", box_src, h, w)
    dy0, dx0, dy1, dx1 = _check_box("box_dst", box_dst, h, w)
    crop = feat[..., sy0:sy1, sx0:sx1, :]
    size = (*crop.shape[:-3], dy1 - dy0, dx1 - dx0, crop.shape[-1])
    if size != crop.shape:
        crop = jax.image.resize(crop.astype(jnp.float32), size, method="bilinear").astype(feat.dtype)
    return feat.at[..., dy0:dy1, dx0:dx1, :].set(crop)
