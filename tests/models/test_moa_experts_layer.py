"""BAM soft Mixture of Attention experts inside the attention layer: the router it owns, one expert = the softmax
layer, identical experts (Q, K, V and O copied between experts) = router-invariant output."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
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


# Both slow (~11 s each): upcycling is an offline conversion; the experts it fills are tested by default.
@pytest.mark.slow
@pytest.mark.parametrize("kv_shared", [True, False])
def test_upcycling_copies_experts_averages_the_rest_and_copies_of_one_seed_give_the_seed(kv_shared):
    import dataclasses

    from models.layers.mixers.moa_experts import upcycle
    from models.llm import LLM, LLMConfig

    seed_config = LLMConfig(vocab_size=31, width=24, depth=1, num_heads=2, num_kv_heads=1, head_dim=6,
                            mlp_width=16, parallel_block=True)
    moe_config = dataclasses.replace(seed_config, num_heads=4, num_kv_heads=1 if kv_shared else 2,
                                     attention="moa_experts",
                                     attention_kwargs={"num_experts": 2, "kv_shared": kv_shared},
                                     ffn_experts={"num_experts": 2, "top_k": 1})
    seeds = [LLM(seed_config, rngs=nnx.Rngs(i)) for i in (1, 2)]
    moe = upcycle(seeds, moe_config, rngs=nnx.Rngs(3))
    block, first, second = moe.blocks[0], seeds[0].blocks[0], seeds[1].blocks[0]
    np.testing.assert_array_equal(block.mlp.gate_up_ed2f[...][1], second.mlp.gate_up_d2f[...])
    np.testing.assert_array_equal(block.attention.query_dnh[...][:, 2:], second.attention.query_dnh[...])
    np.testing.assert_array_equal(block.attention.out_nhd[...][:2], first.attention.out_nhd[...])
    mean = lambda get: (get(seeds[0]) + get(seeds[1])) / 2
    np.testing.assert_allclose(moe.embed.embedding_vd[...], mean(lambda s: s.embed.embedding_vd[...]), rtol=1e-6)
    key = (mean(lambda s: s.blocks[0].attention.key_dkh[...]) if kv_shared
           else jnp.concatenate([first.attention.key_dkh[...], second.attention.key_dkh[...]], 1))
    np.testing.assert_allclose(block.attention.key_dkh[...], key, rtol=1e-6)
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 31, (2, 5)), jnp.int32)
    copies = upcycle([seeds[0], seeds[0]], moe_config, rngs=nnx.Rngs(4))
    np.testing.assert_allclose(copies(tokens), seeds[0](tokens), rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="num_experts=3"):
        upcycle(seeds + seeds[:1], moe_config, rngs=nnx.Rngs(5))
