"""NAT's and TransNeXt's convolutional stems and downsamplers (models/layers/conv_embed.py)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from models.layers.conv_embed import ConvDownsample, ConvTokenizer, OverlapDownsample, OverlapEmbedding


def _conv_numpy(x, kernel, bias, stride, pad):
    """Direct cross-correlation with zero padding, NHWC / HWIO, the definition the modules must follow."""
    x = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    k = kernel.shape[0]
    out_h, out_w = (x.shape[1] - k) // stride + 1, (x.shape[2] - k) // stride + 1
    out = np.zeros((x.shape[0], out_h, out_w, kernel.shape[-1]))
    for i in range(out_h):
        for j in range(out_w):
            window = x[:, i * stride:i * stride + k, j * stride:j * stride + k, :]
            out[:, i, j] = np.einsum("bhwc,hwco->bo", window, kernel)
    return out + (0 if bias is None else bias)


def _layer_norm(x, eps):
    mean, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps)


def test_downsamplers_are_a_3x3_stride_2_convolution_then_layer_norm():
    x = np.random.default_rng(0).standard_normal((2, 6, 4, 3)).astype(np.float32)
    for cls, has_bias in ((ConvDownsample, False), (OverlapDownsample, True)):
        module = cls(3, 5, norm_eps=1e-5, rngs=nnx.Rngs(0), param_dtype=jnp.float32)
        assert (module.conv.bias is not None) == has_bias
        bias = None if module.conv.bias is None else np.asarray(module.conv.bias[...])
        want = _layer_norm(_conv_numpy(x, np.asarray(module.conv.kernel[...]), bias, 2, 1), 1e-5)
        np.testing.assert_allclose(np.asarray(module(jnp.asarray(x))), want, atol=2e-5)


def test_stems_give_row_major_tokens_at_a_quarter_resolution():
    x = np.random.default_rng(1).standard_normal((1, 8, 12, 2)).astype(np.float32)
    overlap = OverlapEmbedding(4, 2, 6, rngs=nnx.Rngs(0))
    grid = _layer_norm(_conv_numpy(x, np.asarray(overlap.conv.kernel[...]), np.asarray(overlap.conv.bias[...]), 4, 3),
                       1e-6)
    assert overlap.conv.kernel.shape == (7, 7, 2, 6)
    np.testing.assert_allclose(np.asarray(overlap(jnp.asarray(x))), grid.reshape(1, 6, 6), atol=2e-5)
    tokenizer = ConvTokenizer(4, 2, 6, rngs=nnx.Rngs(0))
    assert tokenizer(jnp.asarray(x)).shape == (1, 2 * 3, 6)
    with pytest.raises(ValueError, match="patch_size must be 4, got 2"):
        ConvTokenizer(2, 2, 6, rngs=nnx.Rngs(0))
