"""BAM's parallel attention + FFN block (LLMConfig.parallel_block): y = x + Attn(LN x) + FFN(LN x) from one norm,
written out against the block's own submodules; it differs from the sequential block with the same weights. The
full BAM block (soft attention experts, top-k FFN experts): cached decode == full forward, balance loss sown."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from models.llm import LLM, LLMConfig
from nnx_helpers import assert_decode_equals_full_forward, forward

# B=2, T=6, vocab 31, width 24, N=4 heads of H=6 over K=2 kv heads, F=40: distinct sizes per axis.
BASE = LLMConfig(vocab_size=31, width=24, depth=2, num_heads=4, num_kv_heads=2, mlp_width=40)
PARALLEL = dataclasses.replace(BASE, parallel_block=True, attention="moa_experts",
                               attention_kwargs={"num_experts": 2, "kv_shared": True},
                               ffn_experts={"num_experts": 3, "top_k": 2})
TOKENS = jnp.asarray(np.random.default_rng(0).integers(0, 31, (2, 6)), jnp.int32)



@functools.partial(nnx.jit, static_argnums=2)
def _by_hand(model, tokens, parallel: bool):
    """The block formula from the submodules; the sequential one reuses the parallel model's single norm for both
    branches, so that the two differ only in where the MLP reads its input."""
    x = model.embed(tokens)
    for block in model.blocks:
        normed = block.attention_norm(x)
        if parallel:
            x = x + block.attention(normed) + block.mlp(normed)
        else:
            x = x + block.attention(normed)
            x = x + block.mlp(block.attention_norm(x))
    return model.logits(x)


def test_parallel_block_is_attention_plus_mlp_of_one_norm():
    model = LLM(PARALLEL, rngs=nnx.Rngs(0))
    plain = nnx.eval_shape(lambda: LLM(dataclasses.replace(PARALLEL, parallel_block=False), rngs=nnx.Rngs(0)))
    assert all(block.mlp_norm is None for block in model.blocks)  # one norm per block
    count = lambda m: sum(leaf.size for leaf in jax.tree.leaves(nnx.state(m, nnx.Param)))
    assert count(plain) - count(model) == BASE.depth * BASE.width  # the dropped MLP norms only
    out = forward(model, TOKENS)
    np.testing.assert_allclose(out, _by_hand(model, TOKENS, True), rtol=2e-5, atol=2e-5)
    assert np.abs(np.asarray(out) - np.asarray(_by_hand(model, TOKENS, False))).max() > 1e-3


def test_decode_equals_the_fullforward():
    model = LLM(PARALLEL, rngs=nnx.Rngs(1))
    assert_decode_equals_full_forward(model, TOKENS)


@pytest.mark.slow  # the sown loss of one ExpertSwiGLU is a default test in test_moa_experts_layer.py
def test_ffn_experts_sow_their_weighted_balance_loss_per_layer():
    from attnx.ops.experts.ffn import top_k_routing
    from models.layers.mixers import call_with_auxiliary_loss

    model = LLM(PARALLEL, rngs=nnx.Rngs(2))
    assert model.blocks[0].mlp.gate_up_ed2f.shape == (3, 24, 2, 40)
    _, loss = nnx.jit(call_with_auxiliary_loss)(model, TOKENS)
    x, expected = model.embed(TOKENS), []
    for block in model.blocks:  # each layer's loss from its own router on its normalised input
        normed = block.attention_norm(x)
        expected.append(0.01 * top_k_routing(normed @ block.mlp.router_de[...], 2)[1])
        x = x + block.attention(normed) + block.mlp(normed)
    np.testing.assert_allclose(loss, np.mean(expected), rtol=1e-5)


def test_errors_name_the_option():
    with pytest.raises(ValueError, match=r"LLMConfig.ffn_experts.top_k: expected an int in \[1, num_experts=2\]"):
        dataclasses.replace(BASE, ffn_experts={"num_experts": 2, "top_k": 3})
    with pytest.raises(ValueError, match="unknown keys \\['k'\\]"):
        dataclasses.replace(BASE, ffn_experts={"num_experts": 2, "k": 1})
    with pytest.raises(ValueError, match="parallel_block=True .* needs use_mlp=True"):
        dataclasses.replace(BASE, parallel_block=True, use_mlp=False)
    with pytest.raises(ValueError, match="parallel_block must be a bool"):
        dataclasses.replace(BASE, parallel_block="yes")
