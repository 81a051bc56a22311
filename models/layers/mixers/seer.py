"""SeerAttention's gate of one attention layer (Gao et al., 2024, arXiv 2410.13276, §3.1; official AttnGate in
microsoft/SeerAttention `seer_attn/prefill_sparse/attn_gate.py`): owns the per-head bias-free linears that map
block-pooled pre-RoPE queries and keys to the gate width, and returns the gate logits the `seer` attention
function turns into a block mask (math in attnx.ops.seer.gate). Distilled against the frozen model's own attention
by train/seer_distill.py.
"""

import jax
import jax.numpy as jnp
from flax import nnx

from attnx.ops.seer.gate import check_block, check_pools, seer_gate_logits


class SeerGate(nnx.Module):
    """Gate logits [B, N, nb, nb] from the layer's pre-RoPE query [B, T, N, H] and key [B, T, K, H] heads.

    attention_kwargs it reads: block (tokens per block, 64 in the paper), hidden (gate width dg, 128 in the paper;
    smaller for small models), q_pools / k_pools (pool names; the training script's `Qavg_Kmaxminavg` by default),
    rope_theta (set it to the model's rotary base; None for models without rotary positions). Weights are drawn
    from N(0, 0.02^2), the code's `_init_weights` (initializer_range of Llama). With one query pool and hidden ==
    H there is no query linear and the key linear has N heads (the code's `mask_linear_q is None` case).

    Block positions are 0, block, 2 block, ... (the layer does not hand the router its token positions), which is
    right for sequences that start at position 0, the prefill the gate serves; decoding is dense (attnx.ops.seer).
    """

    def __init__(self, width: int, num_heads: int, *, num_kv_heads: int, head_dim: int, qk_head_dim: int | None = None,
                 block: int = 64, hidden: int = 128, q_pools=("avg",), k_pools=("max", "min", "avg"),
                 rope_theta: float | None = 10_000.0, rngs: nnx.Rngs, param_dtype=jnp.float32, **options):
        del width, options  # the sparsity options (threshold, nz_ratio, dense_last) are the attention function's
        if isinstance(hidden, bool) or not isinstance(hidden, int) or hidden < 1 or \
                (rope_theta is not None and hidden % 2):
            raise ValueError(f"seer.hidden: expected a positive int (even with rotary positions), got {hidden!r}")
        self.block = check_block(block)
        self.q_pools, self.k_pools = check_pools("q_pools", q_pools), check_pools("k_pools", k_pools)
        self.rope_theta = rope_theta
        H = qk_head_dim or head_dim
        init = nnx.initializers.normal(0.02)
        skip_query = len(self.q_pools) == 1 and hidden == H
        self.q_weight = None if skip_query else \
            nnx.Param(init(rngs.params(), (num_heads, H * len(self.q_pools), hidden), param_dtype))
        self.k_weight = nnx.Param(init(rngs.params(), (num_heads if skip_query else num_kv_heads,
                                                        H * len(self.k_pools), hidden), param_dtype))

    def __call__(self, x: jax.Array, query: jax.Array, key: jax.Array) -> dict[str, jax.Array]:
        """{"gate_logits": [B, N, nb, nb]} without the block-causal mask: the attention function applies the
        layer's own causality before the softmax."""
        del x
        return {"gate_logits": self.logits(query, key, causal=False)}

    def logits(self, query: jax.Array, key: jax.Array, *, causal: bool = True) -> jax.Array:
        """The gate logits; causal=True sets blocks above the diagonal to -1e9 (what distillation trains on)."""
        q_weight = None if self.q_weight is None else self.q_weight[...]
        return seer_gate_logits(query, key, q_weight, self.k_weight[...], block=self.block, q_pools=self.q_pools,
                                k_pools=self.k_pools, rope_theta=self.rope_theta, causal=causal)
