"""The learned Gaussians of a GAAM attention layer (Ioannides et al., 2024, arXiv 2401.11143, §3; formula in
attnx.ops.gaussian): per key/value head, G offsets delta (init 0) and scales c (init exp(N(0, 1))), as the official
code's GaussianAdaptiveAttention initialises mean_offsets and c."""

import jax
import jax.numpy as jnp
from flax import nnx


class GAAMGaussians(nnx.Module):
    """Returns {"delta": [K, G], "c": [K, G]} for attnx's `gaam` attention function."""

    def __init__(self, width: int, num_heads: int, *, num_kv_heads: int, num_gaussians: int = 4, rngs: nnx.Rngs,
                 param_dtype=jnp.float32, **options):
        del width, num_heads, options  # the layer's shape and the attention function's own options
        if not isinstance(num_gaussians, int) or isinstance(num_gaussians, bool) or num_gaussians < 1:
            raise ValueError(f"gaam.num_gaussians: expected a positive int, got {num_gaussians!r}")
        self.delta_kg = nnx.Param(jnp.zeros((num_kv_heads, num_gaussians), param_dtype))
        self.c_kg = nnx.Param(jnp.exp(jax.random.normal(rngs.params(), (num_kv_heads, num_gaussians))).astype(
            param_dtype))

    def __call__(self, x: jax.Array, query: jax.Array, key: jax.Array | None = None) -> dict[str, jax.Array]:
        return {"delta": self.delta_kg[...], "c": self.c_kg[...]}
