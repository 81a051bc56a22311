"""Relative-position weights of the local attention mechanisms (attnx/ops/local), owned beside the shared attention
layer's projections and handed to the attention function on every call (ROUTERS in models/layers/mixers).

NeighborhoodBias: NAT's relative positional bias, one table per query head [N, 2k_1 - 1, ...] (Hassani et al.,
    2023, arXiv 2204.07143, §3.1); built only when attention_kwargs ask for it (use_rpb=True), as NATTEN's
    NeighborhoodAttention2D(rel_pos_bias=True). Init: truncated normal, std 0.02, as NAT.
HaloRelativeEmbedding: HaloNet's factorised relative embeddings, one [2 (b + 2h) - 1, H] table per grid axis shared
    by all heads (Vaswani et al., 2021, arXiv 2103.12731, §2.2; timm's PosEmbedRel, initialised truncated-normal
    with std H^-1/2 as timm does).
"""

import jax
import jax.numpy as jnp
from flax import nnx

from attnx.ops.local.tables import per_axis


def _truncated_normal(std: float):
    """timm's trunc_normal_(std=std) with its default absolute bounds (-2, 2), as NAT and timm's HaloNet use."""
    return lambda rng, shape, dtype: std * jax.random.truncated_normal(rng, -2.0 / std, 2.0 / std, shape, dtype)


def _rank(grid) -> int:
    return 1 if grid is None else len(tuple(grid))


class NeighborhoodBias(nnx.Module):
    """{"rpb": [N, 2k_1 - 1, ...]} for neighbourhood attention when use_rpb=True, else {} (no weights)."""

    def __init__(self, width: int, num_heads: int, *, grid=None, kernel_size=7, use_rpb: bool = False,
                 rngs: nnx.Rngs, param_dtype=jnp.float32, **options):
        del width, options  # the layer's shape and the mechanism's other options, read by the attention function
        kernel = per_axis("neighborhood.kernel_size", kernel_size, _rank(grid), minimum=1)
        init = _truncated_normal(0.02)
        shape = (num_heads, *(2 * k - 1 for k in kernel))
        self.rpb = nnx.Param(init(rngs.params(), shape, param_dtype)) if use_rpb else None

    def __call__(self, x: jax.Array, query: jax.Array, key: jax.Array | None = None) -> dict[str, jax.Array]:
        return {} if self.rpb is None else {"rpb": self.rpb[...]}


class HaloRelativeEmbedding(nnx.Module):
    """{"rel": (r_0, r_1, ...)}, one [2 (b_a + 2 h_a) - 1, H] table per grid axis (height first)."""

    def __init__(self, width: int, num_heads: int, *, grid=None, block_size=8, halo_size=3, head_dim: int,
                 qk_head_dim: int | None = None, rngs: nnx.Rngs, param_dtype=jnp.float32, **options):
        del width, num_heads, options
        rank = _rank(grid)
        block = per_axis("halo.block_size", block_size, rank, minimum=1)
        halo = per_axis("halo.halo_size", halo_size, rank, minimum=0)
        dim = qk_head_dim or head_dim
        init = _truncated_normal(dim**-0.5)
        self.rank = rank
        for axis, (b, h) in enumerate(zip(block, halo)):
            setattr(self, f"rel_{axis}", nnx.Param(init(rngs.params(), (2 * (b + 2 * h) - 1, dim), param_dtype)))

    def __call__(self, x: jax.Array, query: jax.Array, key: jax.Array | None = None) -> dict[str, tuple]:
        return {"rel": tuple(getattr(self, f"rel_{axis}")[...] for axis in range(self.rank))}
