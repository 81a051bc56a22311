"""The Transformer-LS weights of one attention layer: the dynamic projection W_P and the two DualLN norms (Zhu et
al., 2021, arXiv 2107.02192, §3.2-3.3; the pure function is attnx.ops.efficient.longshort)."""

import jax
import jax.numpy as jnp
from flax import nnx

from attnx.ops.efficient.longshort import projection_weights


class LongShortProjection(nnx.Module):
    """Owns projection [K, H, r] (U(-1/sqrt(H), 1/sqrt(H))) and the window / projection LayerNorms' scale and bias
    [K, H] (1 and 0 at init). rank: r, default 16 (CAB's non-causal num_landmarks; set rank=1 for CAB's causal
    chunk_rank, as configs/attention/longshort.gin does). The norms are shared by keys and values, so the value
    head size must equal the key head size."""

    def __init__(self, width: int, num_heads: int, *, num_kv_heads: int, head_dim: int, qk_head_dim: int | None = None,
                 rank: int | None = None, rngs: nnx.Rngs, param_dtype=jnp.float32, **options):
        del width, num_heads, options
        qk_dim = qk_head_dim or head_dim
        if qk_dim != head_dim:
            raise ValueError(f"longshort: DualLN is shared by keys and values, so qk_head_dim ({qk_dim}) must equal "
                             f"head_dim ({head_dim})")
        r = 16 if rank is None else rank
        if not isinstance(r, int) or isinstance(r, bool) or r < 1:
            raise ValueError(f"longshort.rank: expected an int >= 1, got {rank!r}")
        self.projection = nnx.Param(projection_weights(rngs.params(), num_kv_heads, head_dim, r, param_dtype))
        shape = (num_kv_heads, head_dim)
        self.window_scale = nnx.Param(jnp.ones(shape, param_dtype))
        self.window_bias = nnx.Param(jnp.zeros(shape, param_dtype))
        self.projection_scale = nnx.Param(jnp.ones(shape, param_dtype))
        self.projection_bias = nnx.Param(jnp.zeros(shape, param_dtype))

    def __call__(self, x: jax.Array, query: jax.Array, key: jax.Array | None = None) -> dict[str, object]:
        del x, query, key
        return {"projection": self.projection[...],
                "window_norm": (self.window_scale[...], self.window_bias[...]),
                "projection_norm": (self.projection_scale[...], self.projection_bias[...])}
