"""Convolutional stems and downsamplers of the hierarchical vision transformers (registered in
`models.layers.vision`; grids are [B, h, w, D], images [B, H, W, C]).

- NAT (Hassani et al., 2023, "Neighborhood Attention Transformer", arXiv 2204.07143, §3.1): a tokenizer of two
  3x3 stride-2 convolutions (4x downsampling; no activation between them in the code) then LayerNorm, and 3x3
  stride-2 convolutions without bias then LayerNorm between stages ("overlapping" tokenizer and downsampler).
- TransNeXt (Shi, 2024, "TransNeXt: Robust Foveal Visual Perception for Vision Transformers", arXiv 2311.17132;
  code `OverlapPatchEmbed`) and PVTv2: a k x k convolution with stride s and padding k // 2, then LayerNorm; the stem
  is 7x7 stride 4, the downsamplers 3x3 stride 2.
"""

import jax
import jax.numpy as jnp
from flax import nnx

from models.layers.norm import LayerNorm


def _conv(in_features: int, out_features: int, kernel: int, stride: int, *, use_bias: bool, rngs: nnx.Rngs,
          param_dtype) -> nnx.Conv:
    # PyTorch's Conv2d default (kaiming_uniform with a = sqrt(5)): uniform(+-1/sqrt(fan_in)), the papers' init.
    init = nnx.initializers.variance_scaling(1 / 3, "fan_in", "uniform")
    return nnx.Conv(in_features, out_features, kernel_size=(kernel, kernel), strides=(stride, stride),
                    padding=((kernel // 2, kernel // 2),) * 2, use_bias=use_bias, kernel_init=init,
                    rngs=rngs, param_dtype=param_dtype)


def _tokens(grid: jax.Array) -> jax.Array:
    return grid.reshape(grid.shape[0], -1, grid.shape[-1])


class ConvTokenizer(nnx.Module):
    """NAT's stem: images -> tokens at 1/4 resolution by two 3x3 stride-2 convolutions and LayerNorm."""

    def __init__(self, patch_size: int, channels: int, width: int, *, rngs: nnx.Rngs, param_dtype=jnp.float32):
        if patch_size != 4:
            raise ValueError(f"embed='conv_tokenizer' downsamples by 4 (two stride-2 convolutions); patch_size must "
                             f"be 4, got {patch_size}")
        self.first = _conv(channels, width // 2, 3, 2, use_bias=True, rngs=rngs, param_dtype=param_dtype)
        self.second = _conv(width // 2, width, 3, 2, use_bias=True, rngs=rngs, param_dtype=param_dtype)
        self.norm = LayerNorm(width, eps=1e-5, param_dtype=param_dtype)

    def __call__(self, images: jax.Array) -> jax.Array:
        return _tokens(self.norm(self.second(self.first(images))))


class OverlapEmbedding(nnx.Module):
    """TransNeXt / PVTv2 stem: a (2p - 1) x (2p - 1) convolution with stride p (7x7 stride 4 at p = 4), then
    LayerNorm; H / p x W / p tokens when p divides the image."""

    def __init__(self, patch_size: int, channels: int, width: int, *, rngs: nnx.Rngs, param_dtype=jnp.float32):
        self.conv = _conv(channels, width, 2 * patch_size - 1, patch_size, use_bias=True, rngs=rngs,
                          param_dtype=param_dtype)
        self.norm = LayerNorm(width, eps=1e-6, param_dtype=param_dtype)

    def __call__(self, images: jax.Array) -> jax.Array:
        return _tokens(self.norm(self.conv(images)))


class ConvDownsample(nnx.Module):
    """A 3x3 stride-2 convolution then LayerNorm between stages: NAT's (no bias) or TransNeXt's (with bias)."""

    use_bias = False

    def __init__(self, width: int, out_width: int, *, norm_eps: float, rngs: nnx.Rngs, param_dtype):
        self.conv = _conv(width, out_width, 3, 2, use_bias=self.use_bias, rngs=rngs, param_dtype=param_dtype)
        self.norm = LayerNorm(out_width, eps=norm_eps, param_dtype=param_dtype)

    def __call__(self, grid: jax.Array) -> jax.Array:
        return self.norm(self.conv(grid))


class OverlapDownsample(ConvDownsample):
    """TransNeXt's OverlapPatchEmbed between stages: 3x3 stride 2 with bias, then LayerNorm."""

    use_bias = True
