"""Token embedding table that can also act as the (tied) output projection."""

import jax
import jax.numpy as jnp
from flax import nnx


class Embed(nnx.Module):
    """Maps token ids [B, T] to vectors [B, T, D]; `attend` maps vectors back to logits [B, T, vocab]."""

    def __init__(self, vocab_size: int, width: int, *, rngs: nnx.Rngs, param_dtype=jnp.float32):
        # Unit-variance rows, as in Llama; the output projection (when tied) rescales by 1/sqrt(D) in `attend`.
        self.embedding_vd = nnx.Param(nnx.initializers.normal(1.0)(rngs.params(), (vocab_size, width), param_dtype))

    def __call__(self, token_ids: jax.Array) -> jax.Array:
        return jnp.take(self.embedding_vd[...], token_ids, axis=0)

    def attend(self, x: jax.Array) -> jax.Array:
        width = x.shape[-1]
        return jnp.einsum("...d,vd->...v", x, self.embedding_vd[...]) * (width**-0.5)
