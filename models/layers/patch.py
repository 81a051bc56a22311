"""Images to patch tokens and back, the patch embedding, and fixed 2-D sin-cos position embeddings.

Patch tokens flatten each p x p x C patch in (row, column, channel) order, the order of DiT's `unpatchify`
(`nhwpqc`), so a PyTorch conv kernel [D, C, p, p] maps onto our [p * p * C, D] kernel by a transpose and reshape.
"""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


def _check_divisible(height: int, width: int, patch_size: int) -> None:
    if height % patch_size or width % patch_size:
        raise ValueError(f"image size {height}x{width} is not divisible by patch_size={patch_size}")


def patchify(images: jax.Array, patch_size: int) -> jax.Array:
    """images [B, h * p, w * p, C] -> tokens [B, h * w, p * p * C], tokens in row-major grid order."""
    batch, height, width, channels = images.shape
    _check_divisible(height, width, patch_size)
    grid_h, grid_w = height // patch_size, width // patch_size
    x = images.reshape(batch, grid_h, patch_size, grid_w, patch_size, channels)
    x = x.transpose(0, 1, 3, 2, 4, 5)  # [B, h, w, p, p, C]
    return x.reshape(batch, grid_h * grid_w, patch_size * patch_size * channels)


def unpatchify(tokens: jax.Array, patch_size: int, grid: tuple[int, int], channels: int) -> jax.Array:
    """The inverse of `patchify`: tokens [B, h * w, p * p * C] -> images [B, h * p, w * p, C]."""
    batch, num_tokens, features = tokens.shape
    grid_h, grid_w = grid
    if num_tokens != grid_h * grid_w or features != patch_size * patch_size * channels:
        raise ValueError(f"unpatchify: tokens {tokens.shape} do not match grid {grid}, patch_size={patch_size}, "
                         f"channels={channels} (expected [B, {grid_h * grid_w}, {patch_size**2 * channels}])")
    x = tokens.reshape(batch, grid_h, grid_w, patch_size, patch_size, channels)
    x = x.transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(batch, grid_h * patch_size, grid_w * patch_size, channels)


def sincos_1d(width: int, positions: np.ndarray) -> np.ndarray:
    """[len(positions), width]: sines of positions x 10000^(-2i/width) in the first half, cosines in the second."""
    if width % 2:
        raise ValueError(f"sin-cos embeddings need an even width, got {width}")
    omega = 1.0 / 10_000 ** (np.arange(width // 2, dtype=np.float64) / (width / 2))
    angles = np.asarray(positions, np.float64).reshape(-1)[:, None] * omega[None, :]
    return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)


def sincos_2d(width: int, grid: tuple[int, int]) -> np.ndarray:
    """Fixed 2-D embedding [h * w, width] of MAE/DiT (`get_2d_sincos_pos_embed`): half the channels encode one grid
    coordinate and half the other. As in that code, the first half encodes the column, the second the row, so
    published DiT weights line up."""
    if width % 4:
        raise ValueError(f"2-D sin-cos embeddings need a width divisible by 4, got {width}")
    rows, columns = np.meshgrid(np.arange(grid[0]), np.arange(grid[1]), indexing="ij")
    embedding = np.concatenate([sincos_1d(width // 2, columns), sincos_1d(width // 2, rows)], axis=1)
    return embedding.astype(np.float32)


class PatchEmbed(nnx.Module):
    """images [B, H, W, C] -> tokens [B, (H/p) * (W/p), D]: a p x p convolution with stride p, as a matmul."""

    def __init__(self, patch_size: int, channels: int, width: int, *, rngs: nnx.Rngs, param_dtype=jnp.float32):
        if patch_size < 1:
            raise ValueError(f"patch_size must be >= 1, got {patch_size}")
        self.patch_size = patch_size
        fan_in = patch_size * patch_size * channels
        # Xavier-uniform over the flattened kernel, as DiT and MAE initialise their patch projection.
        self.kernel_pd = nnx.Param(nnx.initializers.xavier_uniform()(rngs.params(), (fan_in, width), param_dtype))
        self.bias_d = nnx.Param(jnp.zeros((width,), param_dtype))

    def __call__(self, images: jax.Array) -> jax.Array:
        tokens = patchify(images, self.patch_size)
        return jnp.einsum("bpf,fd->bpd", tokens, self.kernel_pd[...]) + self.bias_d[...]
