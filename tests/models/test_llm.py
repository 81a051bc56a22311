"""The Llama-style LLM and its layers: shapes, causality, GQA, rotary positions, config validation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from models.layers.attention import Attention
from models.layers.rope import rotary_embedding
from models.llm import LLM, LLMConfig, llm_config

# Distinct sizes per axis (ARCHITECTURE §7): B=2, T=5, width 24, N=4 heads of H=6, K=2 kv heads, F=40.
CONFIG = LLMConfig(vocab_size=256, width=24, depth=2, num_heads=4, num_kv_heads=2, mlp_width=40)


@pytest.fixture(scope="module")
def model():
    return LLM(CONFIG, rngs=nnx.Rngs(0))


def test_logits_shape_and_dtype(model):
    tokens = jnp.arange(10, dtype=jnp.int32).reshape(2, 5)
    logits = model(tokens)
    assert logits.shape == (2, 5, 256) and logits.dtype == jnp.float32


def test_causal_future_tokens_do_not_change_past_logits(model):
    tokens = jax.random.randint(jax.random.key(1), (2, 5), 0, 256)
    changed = tokens.at[:, 3:].set((tokens[:, 3:] + 7) % 256)
    before, after = model(tokens), model(changed)
    np.testing.assert_allclose(before[:, :3], after[:, :3], rtol=1e-6, atol=1e-6)
    assert not np.allclose(before[:, 3:], after[:, 3:])


def test_grouped_query_attention_keeps_fewer_key_value_heads(model):
    attention = model.blocks[0].attention
    assert attention.query_dnh[...].shape == (24, 4, 6)
    assert attention.key_dkh[...].shape == attention.value_dkh[...].shape == (24, 2, 6)


def test_gqa_equals_multi_head_with_repeated_key_value_weights():
    """GQA with K heads must equal MHA whose key/value weights repeat each kv head G = N/K times."""
    gqa = Attention(24, 4, 2, 6, rngs=nnx.Rngs(3))
    mha = Attention(24, 4, 4, 6, rngs=nnx.Rngs(4))
    mha.query_dnh[...] = gqa.query_dnh[...]
    mha.out_nhd[...] = gqa.out_nhd[...]
    mha.key_dkh[...] = jnp.repeat(gqa.key_dkh[...], 2, axis=1)
    mha.value_dkh[...] = jnp.repeat(gqa.value_dkh[...], 2, axis=1)
    x = jax.random.normal(jax.random.key(5), (2, 5, 24))
    np.testing.assert_allclose(gqa(x), mha(x), rtol=1e-5, atol=1e-5)


def test_rotary_embedding_makes_scores_depend_on_relative_position_only():
    q = jax.random.normal(jax.random.key(0), (1, 1, 1, 8))
    k = jax.random.normal(jax.random.key(1), (1, 1, 1, 8))

    def score(query_position, key_position):
        rq = rotary_embedding(q, jnp.array([query_position]))
        rk = rotary_embedding(k, jnp.array([key_position]))
        return float(jnp.sum(rq * rk))

    assert score(7, 3) == pytest.approx(score(14, 10), rel=1e-5)
    assert score(7, 3) != pytest.approx(score(7, 5), rel=1e-3)
    np.testing.assert_allclose(jnp.linalg.norm(rotary_embedding(q, jnp.array([9]))), jnp.linalg.norm(q), rtol=1e-6)


def test_tiny_preset_and_overrides():
    assert llm_config("tiny") == LLMConfig()
    assert llm_config("tiny", depth=1).depth == 1
    with pytest.raises(ValueError, match="unknown LLM preset 'huge'.*tiny"):
        llm_config("huge")


@pytest.mark.parametrize("overrides, message", [
    (dict(num_heads=4, num_kv_heads=3), "multiple of num_kv_heads"),
    (dict(width=30, num_heads=4), "not divisible by num_heads"),
    (dict(depth=0), "depth must be a positive int"),
    (dict(param_dtype="float64"), "param_dtype"),
    (dict(attention="no_such_mechanism"), "no_such_mechanism.*softmax"),
])
def test_bad_config_values_are_named(overrides, message):
    with pytest.raises(ValueError, match=message):
        LLMConfig(**overrides)


def test_attention_kwargs_reach_the_attention_function():
    """A soft cap on the logits (a real attnx option) must change the output, so kwargs are not dropped."""
    config = LLMConfig(width=24, depth=1, num_heads=4, num_kv_heads=2, mlp_width=40)
    capped = LLMConfig(width=24, depth=1, num_heads=4, num_kv_heads=2, mlp_width=40,
                       attention_kwargs={"logits_soft_cap": 0.01})
    tokens = jax.random.randint(jax.random.key(2), (2, 5), 0, 256)
    plain_out = LLM(config, rngs=nnx.Rngs(0))(tokens)
    capped_out = LLM(capped, rngs=nnx.Rngs(0))(tokens)
    assert not np.allclose(plain_out, capped_out, atol=1e-4)
