"""CrossFormer's layers around LSDA (Wang et al., 2022, "CrossFormer: A Versatile Vision Transformer Hinging on
Cross-scale Attention", ICLR 2022, arXiv 2108.00154; code cheerss/CrossFormer models/crossformer.py):

    DynamicPositionBias   §3.3 DPB: the MLP that turns relative offsets into the LSDA bias table (a ROUTERS entry
                          of 'lsda': it hands the table to attnx.ops.grouped.lsda as `position_bias`).
    CrossScaleEmbedding   §3.1 CEL at the stem: parallel convolutions of kernels [4, 8, 16, 32] at stride 4,
                          channels D/2, D/4, D/8, D/8, concatenated, then LayerNorm (`PatchEmbed`, patch_norm=True).
    CrossScaleMerging     §3.1 CEL between stages: LayerNorm, then kernels [2, 4] at stride 2, channels D'/2, D'/2
                          (`PatchMerging`).

Kernel lists are constructor arguments. Their defaults scale with the stride as in the paper (stride s: s, 2s, 4s,
8s for the stem; 2, 4 for merging), so 8x8 digits at patch 1 get kernels 1, 2, 4, 8. Padding is (k - s) / 2 per
side as in the code; when k - s is odd (never in the released configs, e.g. kernel 2 at stride 1) the extra row
and column go at the bottom/right so every branch still yields the H / s x W / s grid (PyTorch's symmetric
(k - s) // 2 would give a smaller map that cannot be concatenated).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from attnx.ops.grouped.lsda import dynamic_position_bias, resolve_grouping
from models.layers.norm import LayerNorm

CEL_NORM_EPS = 1e-5  # nn.LayerNorm's default, CrossFormer's patch_norm after the stem


class DynamicPositionBias(nnx.Module):
    """The DPB MLP of one LSDA layer: returns {"position_bias": [(2G-1)^d, N]} for the layer's grid.

    Built by the attention layer with its shapes and attention_kwargs (group_size, mode, interval, dpb_dim). The
    hidden size P is `dpb_dim`, default width // 16 (at least 1): the released code builds
    `DynamicPosBias(dim // 4, ...)`, which divides by 4 again. Linear weights are truncated normal (std 0.02) with
    zero biases and LayerNorms start at identity, CrossFormer's `_init_weights`.
    """

    def __init__(self, width: int, num_heads: int, *, grid: tuple[int, ...] | None = None, group_size: int = 7,
                 mode: str = "sda", interval: int | None = None, dpb_dim: int | None = None,
                 residual: bool = False, rngs: nnx.Rngs, param_dtype=jnp.float32, **layer_shapes):
        del layer_shapes  # num_kv_heads, head_dim, ...: the table has one column per query head
        hidden = max(1, width // 16) if dpb_dim is None else dpb_dim
        if not isinstance(hidden, int) or isinstance(hidden, bool) or hidden < 1:
            raise ValueError(f"lsda.dpb_dim: expected a positive int or None (width // 16), got {dpb_dim!r}")
        self.grid = None if grid is None else tuple(grid)
        if self.grid is not None:
            resolve_grouping(self.grid, group_size, mode, interval)  # bad settings fail at construction
        self.group_size, self.mode, self.interval, self.residual = group_size, mode, interval, bool(residual)
        init = nnx.initializers.truncated_normal(0.02)
        linear = lambda name, fan_in, fan_out: (
            setattr(self, f"{name}_w", nnx.Param(init(rngs.params(), (fan_in, fan_out), param_dtype))),
            setattr(self, f"{name}_b", nnx.Param(jnp.zeros((fan_out,), param_dtype))))
        linear("proj", 2, hidden)
        for i, fan_out in ((1, hidden), (2, hidden), (3, num_heads)):
            setattr(self, f"ln{i}_scale", nnx.Param(jnp.ones((hidden,), param_dtype)))
            setattr(self, f"ln{i}_bias", nnx.Param(jnp.zeros((hidden,), param_dtype)))
            linear(f"fc{i}", hidden, fan_out)

    def params(self) -> dict[str, jax.Array]:
        names = ["proj_w", "proj_b"] + [f"{kind}{i}_{part}" for i in (1, 2, 3)
                                        for kind, part in (("ln", "scale"), ("ln", "bias"), ("fc", "w"), ("fc", "b"))]
        return {name: getattr(self, name)[...] for name in names}

    def table(self, grid: tuple[int, ...]) -> jax.Array:
        """[(2G-1)^d, N] for the group size a block on `grid` uses (G = min(grid) when the grid is that small)."""
        _, group_size, _ = resolve_grouping(tuple(grid), self.group_size, self.mode, self.interval)
        return dynamic_position_bias(self.params(), group_size, ndim=len(grid), residual=self.residual)

    def __call__(self, x: jax.Array, query: jax.Array | None = None, key: jax.Array | None = None) -> dict:
        grid = self.grid if self.grid is not None else (x.shape[1],)
        return {"position_bias": self.table(grid)}


def cross_scale_dims(total: int, count: int, owner: str) -> list[int]:
    """Channels per kernel: total / 2, total / 4, ..., the last two equal (`PatchEmbed`/`PatchMerging` loops)."""
    dims = [total // 2 ** (i + 1) for i in range(count - 1)] + [total // 2 ** (count - 1)]
    if sum(dims) != total or min(dims) < 1:
        raise ValueError(f"{owner}: {count} kernels split width {total} as {dims}, which does not add up; use a "
                         f"width divisible by {2 ** (count - 1)} or fewer kernels")
    return dims


def _check_kernels(owner: str, kernel_sizes, stride: int) -> tuple[int, ...]:
    kernels = tuple(kernel_sizes)
    if not kernels or not all(isinstance(k, int) and not isinstance(k, bool) and k >= stride for k in kernels):
        raise ValueError(f"{owner}.kernel_sizes: expected ints >= the stride {stride}, got {kernel_sizes!r}")
    return kernels


class _MultiKernelConv(nnx.Module):
    """Parallel stride-s convolutions, one per kernel size, concatenated along channels (NHWC)."""

    def __init__(self, in_channels: int, dims: list[int], kernels: tuple[int, ...], stride: int, *,
                 rngs: nnx.Rngs, param_dtype):
        self.kernels, self.stride = kernels, stride
        # PyTorch's Conv2d default (CrossFormer leaves convolutions to it): kaiming_uniform(a=sqrt(5)), i.e.
        # uniform with variance 1 / (3 fan_in), and a bias uniform in +-1 / sqrt(fan_in).
        init = nnx.initializers.variance_scaling(1 / 3, "fan_in", "uniform")
        weights, biases = [], []
        for kernel, dim in zip(kernels, dims):
            weights.append(nnx.Param(init(rngs.params(), (kernel, kernel, in_channels, dim), param_dtype)))
            bound = 1 / math.sqrt(kernel * kernel * in_channels)
            biases.append(nnx.Param(jax.random.uniform(rngs.params(), (dim,), param_dtype, -bound, bound)))
        self.weights, self.biases = nnx.List(weights), nnx.List(biases)

    def __call__(self, x: jax.Array) -> jax.Array:
        outputs = []
        for kernel, weight, bias in zip(self.kernels, self.weights, self.biases):
            low = (kernel - self.stride) // 2
            padding = [(low, kernel - self.stride - low)] * 2
            y = jax.lax.conv_general_dilated(x, weight[...].astype(x.dtype), (self.stride, self.stride), padding,
                                             dimension_numbers=("NHWC", "HWIO", "NHWC"))
            outputs.append(y + bias[...].astype(x.dtype))
        return jnp.concatenate(outputs, axis=-1)


class CrossScaleEmbedding(nnx.Module):
    """CEL stem (EMBEDDINGS 'cel'): images [B, H, W, C] -> tokens [B, (H/p) (W/p), D], row-major.

    kernel_sizes: default (p, 2p, 4p, 8p), CrossFormer's [4, 8, 16, 32] at p = 4.
    """

    def __init__(self, patch_size: int, channels: int, width: int, *, rngs: nnx.Rngs, param_dtype=jnp.float32,
                 kernel_sizes: tuple[int, ...] | None = None):
        kernels = _check_kernels("CrossScaleEmbedding", kernel_sizes or tuple(patch_size * 2 ** i for i in range(4)),
                                 patch_size)
        self.patch_size = patch_size
        self.convs = _MultiKernelConv(channels, cross_scale_dims(width, len(kernels), "CrossScaleEmbedding"),
                                      kernels, patch_size, rngs=rngs, param_dtype=param_dtype)
        self.norm = LayerNorm(width, eps=CEL_NORM_EPS, param_dtype=param_dtype)

    def __call__(self, images: jax.Array) -> jax.Array:
        batch, height, width, _ = images.shape
        if height % self.patch_size or width % self.patch_size:
            raise ValueError(f"CrossScaleEmbedding: image {height}x{width} is not divisible by patch_size="
                             f"{self.patch_size}")
        x = self.norm(self.convs(images))
        return x.reshape(batch, -1, x.shape[-1])


class CrossScaleMerging(nnx.Module):
    """CEL merge (MERGES 'cel'): grid [B, h, w, D] -> LayerNorm -> kernels (2, 4) at stride 2 -> [B, h/2, w/2, D'],
    channels D'/2 and D'/2."""

    def __init__(self, width: int, out_width: int, *, norm_eps: float, rngs: nnx.Rngs, param_dtype=jnp.float32,
                 kernel_sizes: tuple[int, ...] = (2, 4)):
        kernels = _check_kernels("CrossScaleMerging", kernel_sizes, 2)
        self.norm = LayerNorm(width, eps=norm_eps, param_dtype=param_dtype)
        self.convs = _MultiKernelConv(width, cross_scale_dims(out_width, len(kernels), "CrossScaleMerging"),
                                      kernels, 2, rngs=rngs, param_dtype=param_dtype)

    def __call__(self, grid: jax.Array) -> jax.Array:
        if grid.shape[1] % 2 or grid.shape[2] % 2:
            raise ValueError(f"CrossScaleMerging: the grid {grid.shape[1]}x{grid.shape[2]} is not even")
        return self.convs(self.norm(grid))
