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
