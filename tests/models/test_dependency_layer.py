"""Reversed attention inside the ViT attention layer: the router's gates reach the attention function (the layer equals
its hand-composed projections, gates and reversed reference), the gates' shapes and ranges, the layer refuses causal
use; slow: the layer's loss trains both gates (non-zero router gradients). The overlay configs/attention/reversed.gin
builds the whole ViT (tests/configs)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from attnx.ops.dependency.reversed import reversed_reference
from models.layers.attention import Attention, token_mixer
from models.layers.mixers.dependency import DependencyGates
from nnx_helpers import filled_from_numpy

X = jax.random.normal(jax.random.key(0), (2, 5, 16))


def test_layer_is_projections_gates_and_reversed_attention():
    # Weights drawn from numpy (no initialiser compiles); the router's weights are non-zero, so the gates matter.
    layer = filled_from_numpy(lambda: token_mixer(16, 4, attention="reversed",
                                                  attention_kwargs={"temperature": 0.5, "block_size": 2},
                                                  grid=(2, 2), rngs=nnx.Rngs(1)), seed=1)
    assert isinstance(layer, Attention) and isinstance(layer.router, DependencyGates)
    assert layer.router.selector_dn.shape == (16, 4) and layer.router.message_hidden_df.shape == (16, 8)
    assert layer.router.message_out_f1.shape == (8, 1) and layer.router.temperature == 0.5

    @jax.jit
    def run(layer, x):
        query, key, value = layer.project_heads(x)
        gates = layer.router(x, query, key)
        want = layer.output(reversed_reference(query, key, value, **gates))
        return layer(x), want, gates

    got, want, gates = run(layer, X)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-5, rtol=2e-5)
    p, m = np.asarray(gates["head_gates"]), np.asarray(gates["messages"])
    assert p.shape == (2, 5, 4) and m.shape == (2, 5)
    np.testing.assert_allclose(p.sum(-1), 1.0, atol=1e-5)
    assert np.all((m > 0) & (m < 1))


@pytest.mark.slow
def test_the_layer_loss_trains_both_gates():
    layer = token_mixer(16, 4, attention="reversed", attention_kwargs={}, grid=(2, 2), rngs=nnx.Rngs(2))
    grads = nnx.jit(nnx.grad(lambda layer: jnp.sum(jnp.sin(3.0 * layer(X)))))(layer)
    for name in ("selector_dn", "message_hidden_df", "message_out_f1"):
        g = np.asarray(getattr(grads.router, name)[...])
        assert np.all(np.isfinite(g)) and np.abs(g).max() > 0, name


def test_causal_layer_and_bad_temperature_are_refused():
    with pytest.raises(ValueError, match="does not support causal"):
        Attention(16, 4, 4, 4, kind="reversed", causal=True, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="reversed.temperature"):
        nnx.eval_shape(lambda: token_mixer(16, 4, attention="reversed", attention_kwargs={"temperature": -1.0},
                                           grid=(2, 2), rngs=nnx.Rngs(0)))  # abstract: no initialiser runs
