"""BAM soft Mixture of Attention experts inside the attention layer: the router it owns, one expert = the softmax
layer, identical experts (Q, K, V and O copied between experts) = router-invariant output."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from models.layers.attention import Attention

X = jax.random.normal(jax.random.key(0), (2, 5, 24))


def test_router_shape_and_one_expert_is_the_softmax_layer():
    layer = Attention(24, 4, 2, 6, kind="moa_experts", kind_kwargs={"num_experts": 1}, rngs=nnx.Rngs(1))
    assert layer.router.router_de.shape == (24, 1)
    plain = Attention(24, 4, 2, 6, rngs=nnx.Rngs(1))
    np.testing.assert_allclose(layer(X), plain(X), rtol=1e-5, atol=1e-6)


def test_identical_experts_make_the_layer_router_invariant():
    layer = Attention(24, 4, 2, 6, kind="moa_experts", kind_kwargs={"num_experts": 2}, rngs=nnx.Rngs(2))
    for name, axis, half in (("query_dnh", 1, 2), ("key_dkh", 1, 1), ("value_dkh", 1, 1), ("out_nhd", 0, 2)):
        w = getattr(layer, name)[...]
        first = jax.lax.slice_in_dim(w, 0, half, axis=axis)
        getattr(layer, name)[...] = jnp.concatenate([first, first], axis)
    before = layer(X)
    layer.router.router_de[...] = 5.0 * jax.random.normal(jax.random.key(3), (24, 2))
    np.testing.assert_allclose(layer(X), before, rtol=1e-5, atol=1e-6)


def test_kv_shared_experts_own_only_queries_and_outputs():
    """Two KV-shared experts of 2 heads over 2 shared key/value heads: copying Q and O between experts is enough
    for router invariance, since K and V are shared already."""
    layer = Attention(24, 4, 2, 6, kind="moa_experts", kind_kwargs={"num_experts": 2, "kv_shared": True},
                      rngs=nnx.Rngs(4))
    for name, axis in (("query_dnh", 1), ("out_nhd", 0)):
        first = jax.lax.slice_in_dim(getattr(layer, name)[...], 0, 2, axis=axis)
        getattr(layer, name)[...] = jnp.concatenate([first, first], axis)
    before = layer(X)
    assert before.shape == X.shape
    layer.router.router_de[...] = 5.0 * jax.random.normal(jax.random.key(5), (24, 2))
    np.testing.assert_allclose(layer(X), before, rtol=1e-5, atol=1e-6)


def test_one_ffn_expert_is_the_dense_swiglu_and_the_balance_loss_is_sown():
    from models.layers.mixers import call_with_auxiliary_loss
    from models.layers.mixers.moa_experts import ExpertSwiGLU
    from models.layers.mlp import SwiGLU

    one = ExpertSwiGLU(24, 16, num_experts=1, top_k=1, rngs=nnx.Rngs(5))
    dense = SwiGLU(24, 16, rngs=nnx.Rngs(6))
    one.gate_up_ed2f[...] = dense.gate_up_d2f[...][None]
    one.down_efd[...] = dense.down_fd[...][None]
    np.testing.assert_allclose(one(X), dense(X), rtol=1e-5, atol=1e-6)
    experts = ExpertSwiGLU(24, 16, num_experts=3, top_k=2, balance_weight=0.5, rngs=nnx.Rngs(5))
    assert experts.gate_up_ed2f.shape == (3, 24, 2, 16) and experts.down_efd.shape == (3, 16, 24)
    out, loss = call_with_auxiliary_loss(experts, X)
    np.testing.assert_allclose(out, experts(X), rtol=1e-6)
    from attnx.ops.experts.ffn import top_k_routing
    np.testing.assert_allclose(loss, 0.5 * top_k_routing(X @ experts.router_de[...], 2)[1], rtol=1e-6)
