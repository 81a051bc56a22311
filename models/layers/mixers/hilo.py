"""LITv2's layers (Pan, Cai & Zhuang, 2022, "Fast Vision Transformers with HiLo Attention", arXiv 2205.13213;
ziplab/LITv2 classification/models/attentions.py and blocks.py).

HiLo: the whole attention layer (SPATIAL_MIXERS["hilo"]). The code gives the Hi-Fi and the Lo-Fi heads their own
    projections, h_qkv / h_proj and l_q / l_kv / l_proj, and concatenates the two projected outputs with no shared
    projection after them: a block-diagonal output map that the shared `Attention` layer's dense output projection
    cannot express, hence a module of its own. It owns the weights and calls `attnx.ops.hilo.hilo.hilo_layer`.
DWConvMlp: LITv2's feed-forward layer (DWMlp): fc1 -> 3x3 depth-wise convolution (zero padding, bias) over the
    token grid -> GELU -> fc2 (MLPS["dwconv"]).

Init as the code: linear weights truncated normal std 0.02 with zero biases (LITv2._init_weights), the depth-wise
kernel normal(0, sqrt(2 / fan_out)) with fan_out = 3 * 3 (DWMlp._init_weights).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from attnx.ops.hilo.hilo import check_grid, check_options, hilo_heads, hilo_layer

_LINEAR = nnx.initializers.truncated_normal(stddev=0.02)


def _grid2(owner: str, grid) -> tuple[int, int]:
    if not isinstance(grid, (tuple, list)) or len(grid) != 2 or not all(
            isinstance(g, int) and not isinstance(g, bool) and g > 0 for g in grid):
        raise ValueError(f"{owner}.grid: expected (h, w), two positive ints, got {grid!r}")
    return int(grid[0]), int(grid[1])


class HiLo(nnx.Module):
    """HiLo attention with the code's per-branch projections: x [B, T, D] -> [B, T, D], T = h * w tokens row-major.

    Built by `models.layers.attention.token_mixer` as HiLo(width, num_heads, grid=, use_bias=, rngs=, param_dtype=,
    alpha=, window=). alpha: fraction of Lo-Fi heads, int(num_heads * alpha) (default 0.9, the released configs);
    window: s, the Hi-Fi window side and the Lo-Fi pooling size (default 2; 1 = plain MHSA, all heads Lo-Fi).
    use_bias: biases of h_qkv, l_q, l_kv (the code's qkv_bias); h_proj and l_proj always have one. Class tokens are
    refused (LITv2 pools the mean token; use pooling='mean').
    """

    def __init__(self, width: int, num_heads: int, *, grid, use_bias: bool = True, rngs: nnx.Rngs,
                 param_dtype=jnp.float32, alpha: float = 0.9, window: int = 2):
        self.kind = "hilo"
        if width % num_heads:
            raise ValueError(f"HiLo: width={width} is not a multiple of num_heads={num_heads}")
        self.alpha, self.window = check_options(alpha, window)
        self.grid = _grid2("HiLo", grid)
        check_grid(self.grid, self.window)
        self.num_heads = num_heads
        d = width // num_heads
        n_hi, n_lo = hilo_heads(num_heads, self.alpha, self.window)
        params = lambda *shape: nnx.Param(_LINEAR(rngs.params(), shape, param_dtype))
        zeros = lambda size, on=True: nnx.Param(jnp.zeros((size,), param_dtype)) if on else None
        hi, lo = n_hi * d, n_lo * d
        self.h_qkv = params(width, 3 * hi) if n_hi else None
        self.h_qkv_bias = zeros(3 * hi, use_bias and n_hi > 0)
        self.h_proj = params(hi, hi) if n_hi else None
        self.h_proj_bias = zeros(hi, n_hi > 0)
        self.l_q = params(width, lo) if n_lo else None
        self.l_q_bias = zeros(lo, use_bias and n_lo > 0)
        self.l_kv = params(width, 2 * lo) if n_lo else None
        self.l_kv_bias = zeros(2 * lo, use_bias and n_lo > 0)
        self.l_proj = params(lo, lo) if n_lo else None
        self.l_proj_bias = zeros(lo, n_lo > 0)

    def weights(self) -> dict:
        names = ("h_qkv", "h_qkv_bias", "h_proj", "h_proj_bias", "l_q", "l_q_bias", "l_kv", "l_kv_bias", "l_proj",
                 "l_proj_bias")
        return {name: getattr(self, name)[...] for name in names if getattr(self, name) is not None}

    def __call__(self, x: jax.Array) -> jax.Array:
        if x.shape[1] != math.prod(self.grid):
            raise ValueError(f"HiLo: {x.shape[1]} tokens for grid {self.grid}; class tokens are not supported "
                             f"(LITv2 has none): use pooling='mean' (ViTConfig.pooling)")
        return hilo_layer(x, self.weights(), num_heads=self.num_heads, grid=self.grid, alpha=self.alpha,
                          window=self.window)


def depthwise_conv3x3(a: jax.Array, kernel: jax.Array, bias: jax.Array, grid: tuple[int, int]) -> jax.Array:
    """[B, T, F] -> [B, T, F]: the 3x3 depth-wise convolution (zero padding 1, with bias) of the last h * w tokens,
    row-major on `grid`; tokens before them (class tokens, absent in LITv2) are 1 x 1 images: centre tap only."""
    batch, length, features = a.shape
    h, w = grid
    extra = length - h * w
    if extra < 0:
        raise ValueError(f"DWConvMlp: {length} tokens cannot fill the grid {grid}")
    image = a[:, extra:].reshape(batch, h, w, features)
    conv = jax.lax.conv_general_dilated(image, kernel[:, :, None, :].astype(a.dtype), (1, 1), ((1, 1), (1, 1)),
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=features)
    out = conv.reshape(batch, h * w, features)
    if extra:
        out = jnp.concatenate([a[:, :extra] * kernel[1, 1].astype(a.dtype), out], axis=1)
    return out + bias.astype(a.dtype)


class DWConvMlp(nnx.Module):
    """LITv2's DWMlp: fc2(GELU(DWConv3x3(fc1(x)))), `MLPS` signature DWConvMlp(width, mlp_width, *, grid, rngs,
    param_dtype), tokens [B, T, D] -> [B, T, D]. GELU exact (erf), torch's nn.GELU default. Unlike PVTv2's FFN
    there is no residual around the convolution, as the code."""

    def __init__(self, width: int, mlp_width: int, *, grid, rngs: nnx.Rngs, param_dtype=jnp.float32):
        self.grid = _grid2("DWConvMlp", grid)
        self.fc1_df = nnx.Param(_LINEAR(rngs.params(), (width, mlp_width), param_dtype))
        self.fc1_bias_f = nnx.Param(jnp.zeros((mlp_width,), param_dtype))
        self.dwconv_33f = nnx.Param(nnx.initializers.normal(math.sqrt(2.0 / 9))(rngs.params(), (3, 3, mlp_width),
                                                                                 param_dtype))
        self.dwconv_bias_f = nnx.Param(jnp.zeros((mlp_width,), param_dtype))
        self.fc2_fd = nnx.Param(_LINEAR(rngs.params(), (mlp_width, width), param_dtype))
        self.fc2_bias_d = nnx.Param(jnp.zeros((width,), param_dtype))

    def __call__(self, x: jax.Array) -> jax.Array:
        hidden = x @ self.fc1_df[...] + self.fc1_bias_f[...]
        hidden = depthwise_conv3x3(hidden, self.dwconv_33f[...], self.dwconv_bias_f[...], self.grid)
        return jax.nn.gelu(hidden, approximate=False) @ self.fc2_fd[...] + self.fc2_bias_d[...]
