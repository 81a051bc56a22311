"""The MoH router of one attention layer: owns W_r, W_s and W_h, returns per-token head gates, sows the weighted
balance loss (Jin et al., 2024, arXiv 2410.11842, §3.2-3.3; gates and loss in attnx.ops.heads.moh)."""

import jax
import jax.numpy as jnp
from flax import nnx

from attnx.ops.heads.moh import moh_gates, moh_param_free_gates


class MoHRouter(nnx.Module):
    """Gates [B, T, N] from the layer input x [B, T, D] (or, param_free, from the queries).

    Routers are bias-free linears with Xavier-uniform weights, as DiT's initialisation gives the official code's
    nn.Linear routers. balance_weight (0.01 in the paper) scales the sown balance loss.
    """

    def __init__(self, width: int, num_heads: int, *, n_shared: int | None = None, top_k: int | None = None,
                 param_free: bool = False, balance_weight: float = 0.01, rngs: nnx.Rngs, param_dtype=jnp.float32,
                 **options):
        del options  # the layer's shape and the core mechanism's options, used by the attention function
        if n_shared is None or top_k is None:
            raise ValueError(f"moh needs attention_kwargs n_shared (always-on heads) and top_k (routed heads per "
                             f"token), e.g. {{'n_shared': {num_heads // 2}, 'top_k': {max(1, num_heads // 4)}}}; "
                             f"got n_shared={n_shared!r}, top_k={top_k!r}")
        moh_param_free_gates(jnp.zeros((1, 1, num_heads, 2)), n_shared=n_shared, top_k=top_k)  # validates counts
        if not isinstance(balance_weight, (int, float)) or balance_weight < 0:
            raise ValueError(f"moh.balance_weight: expected a number >= 0, got {balance_weight!r}")
        self.num_heads, self.n_shared, self.top_k = num_heads, n_shared, top_k
        self.param_free, self.balance_weight = param_free, float(balance_weight)
        routed = num_heads - n_shared
        init = nnx.initializers.xavier_uniform()
        make = lambda columns: nnx.Param(init(rngs.params(), (width, columns), param_dtype))
        learned = not param_free
        self.routed_dr = make(routed) if learned and top_k > 0 else None
        self.shared_ds = make(n_shared) if learned and n_shared > 1 else None
        self.mix_d2 = make(2) if learned and n_shared > 0 and top_k > 0 else None

    def __call__(self, x: jax.Array, query: jax.Array, key: jax.Array | None = None) -> dict[str, jax.Array]:
        """{"gates": [B, T, N]} for the attention function."""
        return {"gates": self.gates(x, query)}

    def gates(self, x: jax.Array, query: jax.Array) -> jax.Array:
        if self.param_free:  # the routed logit is a norm, which rotary positions keep: pre-RoPE queries do
            return moh_param_free_gates(query, n_shared=self.n_shared, top_k=self.top_k)
        value = lambda p: None if p is None else p[...]
        gates, aux = moh_gates(x, value(self.routed_dr), value(self.shared_ds), value(self.mix_d2),
                               num_heads=self.num_heads, n_shared=self.n_shared, top_k=self.top_k)
        # Recorded only under nnx.capture (the loss function's `call_with_auxiliary_loss`); inference skips it. Only
        # layers with routed heads record one, so the loss averages over routed layers as MoH-DiT/train.py does
        # (an all-shared layer has no balance to keep).
        if hasattr(self, "__captures__") and self.top_k > 0:
            self.sow(nnx.Intermediate, "auxiliary_loss", self.balance_weight * aux["balance_loss"],
                     reduce_fn=lambda _, new: new, init_fn=lambda: jnp.zeros((), jnp.float32))
        return gates
