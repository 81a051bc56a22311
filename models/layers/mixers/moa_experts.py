"""The soft router W_A of a BAM attention layer (Zhang et al., 2024, arXiv 2408.08274, §4): per-token expert
weights r = softmax(W_A x) over E attention experts (attnx.ops.experts.bam mixes the experts' heads with them)."""

import jax
import jax.numpy as jnp
from flax import nnx

from attnx.ops.experts.bam import check_experts


class MoAExpertsRouter(nnx.Module):
    """{"gates": [B, T, E]} from the layer input x [B, T, D]. BAM initialises routers randomly (Figure 1); here a
    bias-free linear with Xavier-uniform weights, as MoH's routers."""

    def __init__(self, width: int, num_heads: int, *, num_kv_heads: int, num_experts: int = 2,
                 kv_shared: bool = False, rngs: nnx.Rngs, param_dtype=jnp.float32, **options):
        del options  # the layer's head sizes and the core mechanism's options, used by the attention function
        check_experts(num_heads, num_kv_heads, num_experts, kv_shared)
        init = nnx.initializers.xavier_uniform()
        self.router_de = nnx.Param(init(rngs.params(), (width, num_experts), param_dtype))

    def __call__(self, x: jax.Array, query: jax.Array, key: jax.Array | None = None) -> dict[str, jax.Array]:
        logits = x.astype(jnp.float32) @ self.router_de[...].astype(jnp.float32)
        return {"gates": jax.nn.softmax(logits, axis=-1)}
