"""Sigma's DiffQKV (spec llm_mechanisms.md §5 (e)): the index maps, GQA and MHA limits, separate K and V head counts
against the explicit-map oracle (forward and gradients, all four CAB patterns through the chunked path), the cached
decode rule, the cache size of the Sigma-1.5B head plan, and errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import attnx
from attnx.ops.heads.diffqkv import flexhead_attention, flexhead_decode, flexhead_reference, head_maps
from attnx.testing.tolerances import assert_close
from models.layers.attention import Attention
from models.llm import LLMConfig

B, T, S, N, H, V = 2, 11, 7, 6, 8, 5
CHUNKED = attnx.Chunked(block_q=4, block_kv=3)


def inputs(num_key_heads, num_value_heads, kv_length=T, seed=0):
    kq, kk, kv = jax.random.split(jax.random.key(seed), 3)
    return (jax.random.normal(kq, (B, T, N, H)), jax.random.normal(kk, (B, kv_length, num_key_heads, H)),
            jax.random.normal(kv, (B, kv_length, num_value_heads, V)))


def test_index_maps_of_the_sigma_1_5b_plan():
    key_map, value_map = head_maps(32, 4, 16)
    assert key_map == tuple(i // 8 for i in range(32))
    assert value_map == tuple(i // 2 for i in range(32))


# (key heads, value heads): fewer K than V (Sigma), fewer V than K (the paper's ablation), neither divides the other
# (lcm path), and equal counts (plain GQA).
@pytest.mark.parametrize("heads", [(1, 3), (3, 1), (2, 3), (2, 2)], ids=lambda h: f"Kk{h[0]}-Kv{h[1]}")
@pytest.mark.parametrize("pattern", ["NS", "CS", "NC", "CC"])
def test_chunked_path_matches_the_explicit_map_oracle(heads, pattern):
    causal, kv_length = pattern in ("CS", "CC"), (S if pattern in ("NC", "CC") else T)
    q, k, v = inputs(*heads, kv_length)
    got = flexhead_attention(q, k, v, causal=causal, implementation=CHUNKED)
    assert got.shape == (B, T, N, V)
    assert_close(got, flexhead_reference(q, k, v, causal=causal), jnp.float32)


def test_gradients_match_the_oracle():
    q, k, v = inputs(1, 3)
    cotangent = jax.random.normal(jax.random.key(5), (B, T, N, V))
    loss = lambda fn: lambda *a: jnp.sum(cotangent * fn(*a))
    got = jax.grad(loss(lambda *a: flexhead_attention(*a, causal=True, implementation=CHUNKED)), (0, 1, 2))(q, k, v)
    want = jax.grad(loss(lambda *a: flexhead_reference(*a, causal=True)), (0, 1, 2))(q, k, v)
    for name, g, w in zip(("query", "key", "value"), got, want):
        assert g.shape == w.shape
        assert_close(g, w, jnp.float32, "gradient", what=name)


def test_equal_counts_are_gqa_and_full_counts_are_mha():
    q, k, v = inputs(2, 2)
    gqa = attnx.dot_product_attention(q, k, v, mask=attnx.Mask(causal=True), implementation="reference")
    assert_close(flexhead_attention(q, k, v, causal=True, implementation="reference"), gqa, jnp.float32)
    q, k, v = inputs(N, N)
    mha = attnx.dot_product_attention(q, k, v, implementation="reference")
    assert_close(flexhead_attention(q, k, v, implementation="reference"), mha, jnp.float32)


def test_decode_over_separate_caches_equals_the_last_rows():
    q, k, v = inputs(1, 3)
    full = flexhead_reference(q, k, v, causal=True)
    padding = lambda x: jnp.concatenate([x, jnp.zeros_like(x[:, :3])], axis=1)  # unwritten slots are not read
    got = flexhead_decode(q[:, -2:], padding(k), padding(v), query_positions=jnp.arange(T - 2, T))
    assert_close(got, full[:, -2:], jnp.float32)


def test_cache_of_the_sigma_plan_is_20_of_32_gqa16_heads():
    def cache_bytes(num_kv_heads, num_value_heads):
        layer = Attention(64, 32, num_kv_heads, 64, kind="diffqkv", num_value_heads=num_value_heads,
                          rngs=nnx.Rngs(0))
        cache = layer.init_cache(1, 16)
        assert cache["key"].shape == (1, 16, num_kv_heads, 64) and cache["value"].shape == (1, 16, num_value_heads, 64)
        return sum(x.nbytes for x in cache.values())

    assert cache_bytes(4, 16) / cache_bytes(16, 16) == 20 / 32


# Slow: the augmented-query factorisation; the default suite keeps diffqkv's gradient and oracle tests.
@pytest.mark.slow
def test_augmented_query_is_two_factors_through_the_hidden_width():
    layer = Attention(12, 4, 1, 4, kind="diffqkv", num_value_heads=2, query_hidden_dim=18, rngs=nnx.Rngs(0))
    assert layer.query_hidden_da.shape == (12, 18) and layer.query_dnh.shape == (18, 4, 4)
    x = jax.random.normal(jax.random.key(1), (2, 5, 12))
    query, key, value = layer.project_heads(x)
    expected = jnp.einsum("btd,da,anh->btnh", x, layer.query_hidden_da[...], layer.query_dnh[...])
    np.testing.assert_allclose(query, expected, rtol=1e-5, atol=1e-6)
    assert key.shape == (2, 5, 1, 4) and value.shape == (2, 5, 2, 4)
    assert layer(x).shape == x.shape


def test_head_count_errors_name_the_fix():
    q, k, v = inputs(4, 3)
    with pytest.raises(ValueError, match=r"key heads \(4\) must divide the number of query heads \(6\)"):
        flexhead_attention(q, k, v)
    with pytest.raises(ValueError, match="only attention 'diffqkv' reads separate key and value head counts"):
        Attention(12, 4, 1, 3, kind="softmax", num_value_heads=2, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="set attention='diffqkv'"):
        LLMConfig(num_kv_heads=1, num_value_heads=2)
    with pytest.raises(ValueError, match="num_value_heads=3"):
        LLMConfig(attention="diffqkv", num_value_heads=3)
