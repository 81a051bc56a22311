"""Root-mean-square layer normalisation (Zhang & Sennrich, 2019), as used by Llama."""

import jax
import jax.numpy as jnp
from flax import nnx


class RMSNorm(nnx.Module):
    """Scales each feature vector to unit RMS, then by a learned per-feature gain (initialised to one).

    The statistics are computed in float32 even for low-precision inputs, because the mean of squares of bfloat16
    activations loses most of its mantissa.
    """

    def __init__(self, width: int, *, eps: float = 1e-6, param_dtype=jnp.float32):
        self.eps = eps
        self.scale_d = nnx.Param(jnp.ones((width,), param_dtype))

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        inverse_rms = jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)
        return (x32 * inverse_rms * self.scale_d[...].astype(jnp.float32)).astype(x.dtype)


class LayerNorm(nnx.Module):
    """Layer normalisation (Ba et al., 2016): zero mean and unit variance per feature vector, then an optional
    learned gain and bias. ViT uses both; DiT's blocks use neither (their adaLN modulation supplies them).

    Statistics in float32, as in RMSNorm.
    """

    def __init__(self, width: int, *, eps: float = 1e-6, use_scale: bool = True, use_bias: bool = True,
                 param_dtype=jnp.float32):
        self.eps = eps
        self.scale_d = nnx.Param(jnp.ones((width,), param_dtype)) if use_scale else None
        self.bias_d = nnx.Param(jnp.zeros((width,), param_dtype)) if use_bias else None

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        mean = jnp.mean(x32, axis=-1, keepdims=True)
        variance = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(variance + self.eps)
        if self.scale_d is not None:
            y = y * self.scale_d[...].astype(jnp.float32)
        if self.bias_d is not None:
            y = y + self.bias_d[...].astype(jnp.float32)
        return y.astype(x.dtype)
