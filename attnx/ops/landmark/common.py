"""Pieces shared by the landmark paths: the regular landmark layout and NaN-free masked softmax pieces.

Layout (spec llm_mechanisms.md §4 (b)): a landmark follows every `block_size` ordinary tokens, so position p is a
landmark iff (p + 1) % (block_size + 1) == 0, and block g spans positions [g (b+1), (g+1)(b+1)) with its landmark
last. The block of position p is p // (b+1), for ordinary tokens and landmarks alike.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

HIGHEST = jax.lax.Precision.HIGHEST


def regular_landmarks(length: int, block_size: int) -> jax.Array:
    """[length] bool: True at the landmark slots p with (p + 1) % (block_size + 1) == 0."""
    return (jnp.arange(length) + 1) % (block_size + 1) == 0


def check_block_size(block_size) -> None:
    if not isinstance(block_size, int) or isinstance(block_size, bool) or block_size < 1:
        raise ValueError(f"landmark.block_size: expected an int >= 1 (ordinary tokens per landmark), got "
                         f"{block_size!r}")


def safe_max(x: jax.Array, mask: jax.Array, axis: int = -1, keepdims: bool = True) -> jax.Array:
    """Max of x over `mask` along `axis`, 0 where nothing is selected (a stabiliser only: no gradient)."""
    m = jnp.max(jnp.where(mask, x, -jnp.inf), axis=axis, keepdims=keepdims)
    return jax.lax.stop_gradient(jnp.where(jnp.isfinite(m), m, 0.0))


def masked_exp(x: jax.Array, mask: jax.Array, shift: jax.Array) -> jax.Array:
    """exp(x - shift) where mask, else 0. The inner `where` keeps unselected (possibly huge) logits out of exp, so
    neither the forward nor the gradient sees inf * 0."""
    return jnp.where(mask, jnp.exp(jnp.where(mask, x - shift, 0.0)), 0.0)


def masked_softmax(x: jax.Array, mask: jax.Array, axis: int = -1) -> jax.Array:
    """Softmax over the selected entries; rows with nothing selected are all 0 (the code's `denom < 0.5 -> 0`)."""
    e = masked_exp(x, mask, safe_max(x, mask, axis))
    denominator = jnp.sum(e, axis=axis, keepdims=True)
    return e / jnp.where(denominator > 0, denominator, 1.0)
