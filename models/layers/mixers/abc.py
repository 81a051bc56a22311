"""The ABC memory-control weights of one attention layer (Peng et al., 2022, arXiv 2110.02488, §3; the pure
function is attnx.ops.efficient.abc)."""

import jax
import jax.numpy as jnp
from flax import nnx

from attnx.ops.efficient.abc import DEFAULT_SLOTS, slot_weights


class ABCMemory(nnx.Module):
    """Owns phi_key [H, n] and phi_value [V, n] (shared by all heads, as CAB's `compress_k`/`compress_v`),
    Xavier-uniform with gain 2^-1/2 as in CAB. num_slots: n (default 16)."""

    def __init__(self, width: int, num_heads: int, *, head_dim: int, qk_head_dim: int | None = None,
                 num_slots: int | None = None, rngs: nnx.Rngs, param_dtype=jnp.float32, **options):
        del width, num_heads, options  # the layer's shape and the attention function's own options
        n = DEFAULT_SLOTS if num_slots is None else num_slots
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise ValueError(f"abc.num_slots: expected an int >= 1, got {num_slots!r}")
        self.phi_key = nnx.Param(slot_weights(rngs.params(), qk_head_dim or head_dim, n, param_dtype))
        self.phi_value = nnx.Param(slot_weights(rngs.params(), head_dim, n, param_dtype))

    def __call__(self, x: jax.Array, query: jax.Array, key: jax.Array | None = None) -> dict[str, jax.Array]:
        del x, query, key  # the slot logits are computed from the (rotated) keys/values inside the function
        return {"phi_key": self.phi_key[...], "phi_value": self.phi_value[...]}
