"""Rotary position embeddings (Su et al., 2021, "RoFormer"), in the half-split layout used by Llama/GPT-NeoX.

A pure function of arrays: the rotation has no parameters, so it needs no module. It lives in attnx because some
mechanisms rotate inside the attention function (StreamingLLM's positions within the cache, SeerAttention's gate at
block positions); models.layers.rope re-exports it for the layers.
"""

import jax
import jax.numpy as jnp


def rotary_embedding(x: jax.Array, positions: jax.Array, *, theta: float = 10_000.0) -> jax.Array:
    """Rotates pairs of features of `x` [B, T, N, H] by angles proportional to `positions` [B, T] or [T].

    Feature i is paired with feature i + H/2 (the "rotate half" convention of Llama in Hugging Face transformers),
    so weights converted from that format work unchanged. Computed in float32, returned in `x.dtype`.
    """
    head_dim = x.shape[-1]
    if head_dim % 2:
        raise ValueError(f"rotary_embedding needs an even head dimension, got H={head_dim}")
    inverse_frequency = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))  # [H/2]
    angles = positions.astype(jnp.float32)[..., None] * inverse_frequency  # [B|, T, H/2]
    if angles.ndim == 2:  # positions given as [T]: shared by the whole batch
        angles = angles[None]
    sin = jnp.sin(angles)[:, :, None, :]  # [B, T, 1, H/2]: broadcast over heads
    cos = jnp.cos(angles)[:, :, None, :]
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return rotated.astype(x.dtype)
