import pytest
"""GAAM inside the attention layer: the Gaussians it owns, the flat-Gaussian limit against a softmax layer, and the
cached decode through the layer."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import attnx
from attnx.ops.gaussian.attention import gaam_attention
from models.layers.attention import Attention

X = jax.random.normal(jax.random.key(0), (2, 5, 24))


# Slow (~9 s): eager layer builds; the layer's numerics are covered by the decode and formula tests.
@pytest.mark.slow
def test_owns_per_kv_head_gaussians_and_keeps_shapes():
    layer = Attention(24, 4, 2, 6, kind="gaam", kind_kwargs={"num_gaussians": 3}, causal=True, rngs=nnx.Rngs(1))
    assert layer.router.delta_kg.shape == (2, 3) and layer.router.c_kg.shape == (2, 3)
    np.testing.assert_array_equal(layer.router.delta_kg[...], 0.0)  # the code's init
    assert layer(X).shape == X.shape


def test_flat_gaussian_without_residual_is_the_softmax_layer_over_n():
    """One very wide Gaussian weights every position 1/S, so the values (and the output, linear in them) are the
    softmax layer's divided by S."""
    layer = Attention(24, 4, 2, 6, kind="gaam", kind_kwargs={"num_gaussians": 1, "residual": False}, causal=False,
                      use_rope=False, rngs=nnx.Rngs(1))
    layer.router.c_kg[...] = jnp.full((2, 1), 1e3)
    plain = Attention(24, 4, 2, 6, causal=False, use_rope=False, rngs=nnx.Rngs(1))
    np.testing.assert_allclose(layer(X), plain(X) / X.shape[1], rtol=1e-4, atol=1e-6)


def test_layer_decode_equals_the_full_forward():
    layer = Attention(24, 4, 2, 6, kind="gaam", causal=True, rngs=nnx.Rngs(2))
    cache = layer.init_cache(2, 8)
    decode = nnx.jit(lambda layer, x, cache, index: layer.decode(x, cache, index))  # eager NNX dispatch is slow
    full = nnx.jit(lambda layer, x: layer(x))(layer, X)
    first, cache = decode(layer, X[:, :3], cache, jnp.int32(0))
    rest, _ = decode(layer, X[:, 3:], cache, jnp.int32(3))
    np.testing.assert_allclose(jnp.concatenate([first, rest], 1), full, rtol=1e-4, atol=1e-5)


def test_owns_stacked_query_and_key_gaussians_that_fit_the_function():
    """Shapes through nnx.eval_shape (no compile); the router's keywords fed to the attention function directly
    (the layer's generic router -> kwargs path is covered by the tests above)."""
    options = {"num_gaussians": 3, "num_layers": 2, "apply_to": ["query", "key", "value"], "axis": "feature"}
    layer = nnx.eval_shape(lambda: Attention(24, 4, 2, 6, kind="gaam", kind_kwargs=options, causal=True,
                                             rngs=nnx.Rngs(1)))
    router = layer.router
    assert router.query_delta_lng.shape == (2, 4, 3) and router.key_c_lkg.shape == (2, 2, 3)
    assert router.delta_lkg.shape == (2, 2, 3)
    # the router's keywords with values of its parameters' shapes (numpy: eager jax ops compile per shape)
    rng = np.random.default_rng(0)
    gaussians = {kw: np.exp(0.3 * rng.standard_normal(getattr(router, name).shape)).astype(np.float32)
                 for kw, name in router.names}
    assert set(gaussians) == {"query_delta", "query_c", "key_delta", "key_c", "delta", "c"}
    q, k, v = (rng.standard_normal((1, 3, h, 6)).astype(np.float32) for h in (4, 2, 2))
    got, plain = jax.jit(lambda q, k, v, g: (gaam_attention(q, k, v, causal=True, **options, **g),
                                             attnx.dot_product_attention(q, k, v, mask=attnx.Mask(causal=True))))(
        q, k, v, gaussians)
    assert got.shape == plain.shape and not np.allclose(got, plain, atol=1e-3)
