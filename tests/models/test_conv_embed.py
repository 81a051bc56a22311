"""NAT's and TransNeXt's convolutional stems and downsamplers (models/layers/conv_embed.py)."""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from models.layers.conv_embed import ConvDownsample, ConvTokenizer, OverlapDownsample, OverlapEmbedding
from nnx_helpers import conv_numpy, layer_norm_numpy


def test_downsamplers_are_a_3x3_stride_2_convolution_thenlayer_norm_numpy():
    x = np.random.default_rng(0).standard_normal((2, 6, 4, 3)).astype(np.float32)
    for cls, has_bias in ((ConvDownsample, False), (OverlapDownsample, True)):
        module = cls(3, 5, norm_eps=1e-5, rngs=nnx.Rngs(0), param_dtype=jnp.float32)
        assert (module.conv.bias is not None) == has_bias
        bias = None if module.conv.bias is None else np.asarray(module.conv.bias[...])
        want = layer_norm_numpy(conv_numpy(x, np.asarray(module.conv.kernel[...]), 0.0 if bias is None else bias, 2, (1, 1)), 1e-5)
        np.testing.assert_allclose(np.asarray(module(jnp.asarray(x))), want, atol=2e-5)


def test_stems_give_row_major_tokens_at_a_quarter_resolution():
    x = np.random.default_rng(1).standard_normal((1, 8, 12, 2)).astype(np.float32)
    overlap = OverlapEmbedding(4, 2, 6, rngs=nnx.Rngs(0))
    grid = layer_norm_numpy(conv_numpy(x, np.asarray(overlap.conv.kernel[...]), np.asarray(overlap.conv.bias[...]), 4, (3, 3)),
                       1e-6)
    assert overlap.conv.kernel.shape == (7, 7, 2, 6)
    np.testing.assert_allclose(np.asarray(overlap(jnp.asarray(x))), grid.reshape(1, 6, 6), atol=2e-5)
    tokenizer = ConvTokenizer(4, 2, 6, rngs=nnx.Rngs(0))
    assert tokenizer(jnp.asarray(x)).shape == (1, 2 * 3, 6)
    with pytest.raises(ValueError, match="patch_size must be 4, got 2"):
        ConvTokenizer(2, 2, 6, rngs=nnx.Rngs(0))
