"""DARE's decoupled representation tables in the LLM (LLMConfig.representation_embeddings): off is the plain
model; on, every attention layer's values are rows of its own token-id table while queries and keys come from the
residual stream, so the table moves the outputs but not the layer's attention map; cached decode == full forward."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from models.layers.attention import Attention
from models.llm import LLM, LLMConfig
from nnx_helpers import assert_decode_equals_full_forward, forward

# B=2, T=6, vocab 31, width 24, N=4 heads of H=6 over K=2 kv heads, F=40: distinct sizes per axis.
BASE = LLMConfig(vocab_size=31, width=24, depth=2, num_heads=4, num_kv_heads=2, mlp_width=40)
ON = dataclasses.replace(BASE, representation_embeddings=True)
TOKENS = jnp.asarray(np.random.default_rng(0).integers(0, 31, (2, 6)), jnp.int32)



def _param_paths(model):
    return {"/".join(map(str, path)) for path, _ in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def _softmax_layer_reference(layer, x, value):
    """Causal GQA softmax attention of `layer` written out: queries/keys from x, the given values [B, T, K, H]."""
    query, key, _ = layer.project(x) if layer.value_table_vkh is None else layer.project(
        x, token_ids=jnp.zeros(x.shape[:2], jnp.int32))
    groups = query.shape[2] // key.shape[2]
    key, value = jnp.repeat(key, groups, axis=2), jnp.repeat(value, groups, axis=2)
    logits = jnp.einsum("btnh,bsnh->bnts", query, key, precision="highest") * query.shape[-1] ** -0.5
    t = x.shape[1]
    logits = jnp.where(jnp.tril(jnp.ones((t, t), bool)), logits, -jnp.inf)
    mixed = jnp.einsum("bnts,bsnh->btnh", jax.nn.softmax(logits, -1), value, precision="highest")
    return layer.output(mixed)


@pytest.mark.slow  # the default model itself is covered by test_llm / test_generation (exact parameter counts)
def test_off_is_the_plain_model_with_projected_values():
    """Off (the default): no tables, the usual value projection, and the sequential pre-norm block."""
    assert not BASE.representation_embeddings
    model = LLM(BASE, rngs=nnx.Rngs(0))
    paths = _param_paths(model)
    assert not any("value_table" in p for p in paths) and sum("value_dkh" in p for p in paths) == BASE.depth

    @nnx.jit
    def reference(model, tokens):
        x = model.embed(tokens)
        for block in model.blocks:
            layer = block.attention
            normed = block.attention_norm(x)
            value = jnp.einsum("btd,dkh->btkh", normed, layer.value_dkh[...])
            x = x + _softmax_layer_reference(layer, normed, value)
            x = x + block.mlp(block.mlp_norm(x))
        return model.logits(x)

    np.testing.assert_allclose(forward(model, TOKENS), reference(model, TOKENS), rtol=2e-5, atol=2e-5)


def test_on_each_layer_owns_a_table_and_its_values_are_the_table_rows():
    model = LLM(ON, rngs=nnx.Rngs(0))
    for block in model.blocks:
        assert block.attention.value_dkh is None
        assert block.attention.value_table_vkh[...].shape == (31, 2, 6)
    paths = _param_paths(model)
    # The tables replace the value projections: width * K * H fewer, vocab * K * H more per layer.
    plain = sum(v.size for v in jax.tree.leaves(nnx.state(nnx.eval_shape(lambda: LLM(BASE, rngs=nnx.Rngs(0))),
                                                               nnx.Param)))
    count = sum(v.size for v in jax.tree.leaves(nnx.state(model, nnx.Param)))
    assert count == plain + BASE.depth * (31 - 24) * 2 * 6 and sum("value_table" in p for p in paths) == 2
    layer = model.blocks[0].attention
    x = model.blocks[0].attention_norm(model.embed(TOKENS))
    expected = _softmax_layer_reference(layer, x, layer.value_table_vkh[...][TOKENS])
    np.testing.assert_allclose(layer(x, token_ids=TOKENS), expected, rtol=2e-5, atol=2e-5)


# Slow: the per-layer table test stays in the default suite.
@pytest.mark.slow
def test_the_table_moves_outputs_but_not_the_attention_map():
    model = LLM(ON, rngs=nnx.Rngs(0))
    layer = model.blocks[0].attention
    x = model.blocks[0].attention_norm(model.embed(TOKENS))
    table = layer.value_table_vkh[...]

    def layer_map_and_output(table):
        layer.value_table_vkh[...] = table
        return layer.attention_probabilities(x, token_ids=TOKENS), forward(model, TOKENS)

    map_before, out_before = layer_map_and_output(table)
    map_after, out_after = layer_map_and_output(table + jax.random.normal(jax.random.key(1), table.shape))
    np.testing.assert_array_equal(map_after, map_before)
    assert np.abs(np.asarray(out_after) - np.asarray(out_before)).max() > 1e-2
    layer.value_table_vkh[...] = table
    # The spec's d logits / d E_rep = 0, through the map of the layer.
    grads = nnx.grad(lambda layer: jnp.sum(layer.attention_probabilities(x, token_ids=TOKENS) ** 2))(layer)
    grad = grads["value_table_vkh"][...]
    assert grad.shape == table.shape and not np.any(np.asarray(grad))
    assert np.any(np.asarray(grads["query_dnh"][...]))  # the map does depend on the attention stream


@pytest.mark.parametrize("attention, kwargs", [pytest.param("softmax", {}, marks=pytest.mark.slow),
                                               ("dare", {"top_k": 3, "time_dim": 2})])
def test_decode_equals_the_fullforward(attention, kwargs):
    model = LLM(dataclasses.replace(ON, attention=attention, attention_kwargs=kwargs), rngs=nnx.Rngs(1))
    assert_decode_equals_full_forward(model, TOKENS)


def test_errors_name_the_option():
    with pytest.raises(ValueError, match="representation_embeddings must be a bool"):
        dataclasses.replace(BASE, representation_embeddings=1)
    with pytest.raises(ValueError, match=r"representation_embeddings=True .*mixers \['tnl'\]"):
        dataclasses.replace(ON, layer_attention=(None, "tnl"))
    layer = Attention(24, 4, 2, 6, value_vocab=31, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="needs token_ids"):
        layer(jnp.zeros((2, 6, 24)))
    with pytest.raises(ValueError, match="value_vocab must be a positive"):
        Attention(24, 4, 2, 6, value_vocab=0, rngs=nnx.Rngs(0))
