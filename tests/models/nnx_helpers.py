"""Helpers shared by the model test files (importable because pytest puts this folder on sys.path)."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


def filled_from_numpy(make, seed: int, scale: float = 0.3):
    """The module `make()` builds, every parameter drawn from numpy (zero-initialised biases, tokens and gates
    included), without running its initialisers: eager jax draws compile once per shape (~1 s of CPU each), so the
    module is traced abstractly and filled from numpy."""
    graphdef, state = nnx.split(nnx.eval_shape(make))
    leaves, treedef = jax.tree_util.tree_flatten(state)
    rng = np.random.default_rng(seed)
    values = [jnp.asarray(scale * rng.standard_normal(leaf.shape), leaf.dtype) for leaf in leaves]
    return nnx.merge(graphdef, jax.tree_util.tree_unflatten(treedef, values))


@nnx.jit
def apply(module, x):
    return module(x)


forward = nnx.jit(lambda model, tokens: model(tokens))
_decode = nnx.jit(lambda model, tokens, cache, index: model.decode(tokens, cache, index))


def assert_decode_equals_full_forward(model, tokens, *, prefill: int = 4, steps: tuple = (4, 5)) -> None:
    """A prefill of the first `prefill` tokens, then one token at each of `steps`, through the KV cache, equal the
    rows of the full forward pass."""
    full = forward(model, tokens)
    cache = model.init_cache(tokens.shape[0], 8)
    out, cache = _decode(model, tokens[:, :prefill], cache, jnp.int32(0))
    np.testing.assert_allclose(out, full[:, :prefill], rtol=1e-5, atol=1e-5)
    for position in steps:
        step, cache = _decode(model, tokens[:, position:position + 1], cache, jnp.int32(position))
        np.testing.assert_allclose(step[:, 0], full[:, position], rtol=1e-5, atol=1e-5)


def conv_numpy(x, weight, bias, stride, padding):
    """Direct convolution in numpy float64: x [B, H, W, C], weight [k, k, C, D], padding (low, high) per axis."""
    x = np.pad(np.asarray(x, np.float64), ((0, 0), padding, padding, (0, 0)))
    k = weight.shape[0]
    rows, cols = (x.shape[1] - k) // stride + 1, (x.shape[2] - k) // stride + 1
    out = np.zeros((x.shape[0], rows, cols, weight.shape[-1]))
    for i in range(rows):
        for j in range(cols):
            patch = x[:, i * stride:i * stride + k, j * stride:j * stride + k, :]
            out[:, i, j] = np.einsum("bhwc,hwcd->bd", patch, np.asarray(weight, np.float64))
    return out + np.asarray(bias, np.float64)


def layer_norm_numpy(x, eps):
    """LayerNorm without affine parameters, in numpy."""
    return (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + eps)
