"""Feed-forward blocks: SwiGLU (Shazeer, 2020, "GLU Variants Improve Transformer"), as used by Llama, and the
two-layer GELU MLP of the original Transformer / ViT / DiT."""

import jax
import jax.numpy as jnp
from flax import nnx

from models.layers.sharding import constrain


class SwiGLU(nnx.Module):
    """down(silu(x @ gate) * (x @ up)).

    The gate and up projections are stored as one [D, 2, F] kernel so that they run as a single matrix multiply:
    on CPU one wide GEMM is measurably faster than two narrow ones.
    """

    def __init__(self, width: int, mlp_width: int, *, rngs: nnx.Rngs, param_dtype=jnp.float32):
        init = nnx.initializers.variance_scaling(1.0, "fan_in", "truncated_normal", in_axis=0, out_axis=(1, 2))
        self.gate_up_d2f = nnx.Param(init(rngs.params(), (width, 2, mlp_width), param_dtype))
        down_init = nnx.initializers.variance_scaling(1.0, "fan_in", "truncated_normal")
        self.down_fd = nnx.Param(down_init(rngs.params(), (mlp_width, width), param_dtype))

    def __call__(self, x: jax.Array) -> jax.Array:
        gate_up = jnp.einsum("...d,dcf->...cf", x, self.gate_up_d2f[...])
        hidden = jax.nn.silu(gate_up[..., 0, :]) * gate_up[..., 1, :]
        hidden = constrain(hidden, "btf") if hidden.ndim == 3 else hidden  # column-parallel: F over tensor
        return jnp.einsum("...f,fd->...d", hidden, self.down_fd[...])


class GeluMlp(nnx.Module):
    """fc2(gelu(fc1(x))) with biases: the MLP of ViT (exact GELU) and DiT (`approximate=True`, GELU-tanh).

    Xavier-uniform kernels and zero biases, the initialisation of both papers' reference code.
    """

    def __init__(self, width: int, mlp_width: int, *, approximate: bool = False, rngs: nnx.Rngs,
                 param_dtype=jnp.float32):
        self.approximate = approximate
        init = nnx.initializers.xavier_uniform()
        self.fc1_df = nnx.Param(init(rngs.params(), (width, mlp_width), param_dtype))
        self.fc1_bias_f = nnx.Param(jnp.zeros((mlp_width,), param_dtype))
        self.fc2_fd = nnx.Param(init(rngs.params(), (mlp_width, width), param_dtype))
        self.fc2_bias_d = nnx.Param(jnp.zeros((width,), param_dtype))

    def __call__(self, x: jax.Array) -> jax.Array:
        hidden = jnp.einsum("...d,df->...f", x, self.fc1_df[...]) + self.fc1_bias_f[...]
        hidden = jax.nn.gelu(hidden, approximate=self.approximate)
        hidden = constrain(hidden, "btf") if hidden.ndim == 3 else hidden  # column-parallel: F over tensor
        return jnp.einsum("...f,fd->...d", hidden, self.fc2_fd[...]) + self.fc2_bias_d[...]
