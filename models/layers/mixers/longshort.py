"""The Transformer-LS weights of one attention layer: the dynamic projection W_P and the two DualLN norms (Zhu et
al., 2021, arXiv 2107.02192, §3.2-3.3; the pure function is attnx.ops.efficient.longshort)."""

import jax
import jax.numpy as jnp
from flax import nnx

from attnx.ops.efficient.longshort import projection_weights

PROJECTION_SOURCES = ("input", "keys")


class LongShortProjection(nnx.Module):
    """Owns the projection W_P and the window / projection LayerNorms' scale and bias [K, H] (1 and 0 at init).

    projection_from: "input" (default, as the official code: logits X W_P + b from the layer input x [B, T, D],
    projection [D, K, r] and bias [K, r] with torch Linear's U(-1/sqrt(D), 1/sqrt(D)) init, passed to the attention
    function as `projection_scores`) or "keys" (logits K W_P from each key head, projection [K, H, r]; the only form
    a KV-cache decode step can evaluate, since it sees the layer input of the new tokens only). rank: r, default 16
    (CAB's non-causal num_landmarks; set rank=1 for CAB's causal chunk_rank). The norms are shared by keys and
    values, so the value head size must equal the key head size. relative_positions: True adds CausalLS's
    Transformer-XL terms (causal layers only): window_net, chunk_net [D, N, H] and chunk_bias [N, H] (r_net without
    bias, r_net_chunk with, torch Linear's U(-1/sqrt(D), 1/sqrt(D)) init) and content_bias / position_bias [N, H]
    (r_w_bias / r_r_bias, zeros at init), over sinusoids of width D (even), as the code does."""

    def __init__(self, width: int, num_heads: int, *, num_kv_heads: int, head_dim: int, qk_head_dim: int | None = None,
                 rank: int | None = None, projection_from: str = "input", relative_positions: bool = False,
                 rngs: nnx.Rngs, param_dtype=jnp.float32, **options):
        del options
        qk_dim = qk_head_dim or head_dim
        if qk_dim != head_dim:
            raise ValueError(f"longshort: DualLN is shared by keys and values, so qk_head_dim ({qk_dim}) must equal "
                             f"head_dim ({head_dim})")
        r = 16 if rank is None else rank
        if not isinstance(r, int) or isinstance(r, bool) or r < 1:
            raise ValueError(f"longshort.rank: expected an int >= 1, got {rank!r}")
        if projection_from not in PROJECTION_SOURCES:
            raise ValueError(f"longshort.projection_from: expected one of {PROJECTION_SOURCES}, got "
                             f"{projection_from!r}")
        self.projection_from = projection_from
        if projection_from == "input":
            bound = width ** -0.5  # torch nn.Linear(D, K r) init, weight and bias alike
            w_rng, b_rng = rngs.params(), rngs.params()
            self.projection = nnx.Param(jax.random.uniform(w_rng, (width, num_kv_heads, r), param_dtype, -bound, bound))
            self.projection_bias = nnx.Param(jax.random.uniform(b_rng, (num_kv_heads, r), param_dtype, -bound, bound))
        else:
            self.projection = nnx.Param(projection_weights(rngs.params(), num_kv_heads, head_dim, r, param_dtype))
        if not isinstance(relative_positions, bool):
            raise ValueError(f"longshort.relative_positions: expected a bool, got {relative_positions!r}")
        self.relative_positions = relative_positions
        if relative_positions:
            if width % 2:
                raise ValueError(f"longshort.relative_positions: the sinusoid width is the layer width, which must be "
                                 f"even, got {width}")
            bound, heads = width ** -0.5, (num_heads, head_dim)
            uniform = lambda shape: jax.random.uniform(rngs.params(), shape, param_dtype, -bound, bound)
            self.window_net = nnx.Param(uniform((width, *heads)))
            self.chunk_net = nnx.Param(uniform((width, *heads)))
            self.chunk_bias = nnx.Param(uniform(heads))
            self.content_bias = nnx.Param(jnp.zeros(heads, param_dtype))
            self.position_bias = nnx.Param(jnp.zeros(heads, param_dtype))
        shape = (num_kv_heads, head_dim)
        self.window_scale = nnx.Param(jnp.ones(shape, param_dtype))
        self.window_bias = nnx.Param(jnp.zeros(shape, param_dtype))
        self.projection_norm_scale = nnx.Param(jnp.ones(shape, param_dtype))
        self.projection_norm_bias = nnx.Param(jnp.zeros(shape, param_dtype))

    def __call__(self, x: jax.Array, query: jax.Array, key: jax.Array | None = None) -> dict[str, object]:
        del query, key
        out = {"window_norm": (self.window_scale[...], self.window_bias[...]),
               "projection_norm": (self.projection_norm_scale[...], self.projection_norm_bias[...])}
        if self.projection_from == "input":
            out["projection_scores"] = (jnp.einsum("btd,dkr->btkr", x.astype(jnp.float32), self.projection[...])
                                        + self.projection_bias[...])
        else:
            out["projection"] = self.projection[...]
        if self.relative_positions:  # replaces the layer's relative_positions=True option with the weights
            out["relative_positions"] = (self.window_net[...], self.chunk_net[...], self.chunk_bias[...],
                                         self.content_bias[...], self.position_bias[...])
        return out
