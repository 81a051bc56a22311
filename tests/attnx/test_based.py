"""Based (spec llm_mechanisms.md §7 (e)): the Taylor identity, linear view = quadratic view (causal, non-causal,
cross), gradients and jvp, the cached decode rule, errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import attnx
from attnx.ops.linear.based import based_attention, based_decode, taylor_feature_map
from attnx.testing.tolerances import assert_close

B, T, S, N, K, H, V = 2, 37, 23, 6, 2, 8, 5


def inputs(kv_length=T, dtype=jnp.float32, seed=0):
    kq, kk, kv = jax.random.split(jax.random.key(seed), 3)
    return (jax.random.normal(kq, (B, T, N, H)).astype(dtype), jax.random.normal(kk, (B, kv_length, K, H)).astype(dtype),
            jax.random.normal(kv, (B, kv_length, K, V)).astype(dtype))


def test_taylor_feature_map_identity():
    x, y = jax.random.normal(jax.random.key(1), (2, 11, 16))
    dot = jnp.sum(x * y, -1)
    expected = 1 + dot / 4 + dot**2 / 32  # d = 16: 1 + s / sqrt(d) + s^2 / (2 d)
    np.testing.assert_allclose(jnp.sum(taylor_feature_map(x) * taylor_feature_map(y), -1), expected, rtol=1e-5)
    assert taylor_feature_map(x).shape == (11, 1 + 16 + 256)


@pytest.mark.parametrize("causal, kv_length", [(True, T), (False, T), (False, S)], ids=["CS", "NS", "NC"])
def test_linear_view_equals_quadratic_view(causal, kv_length):
    q, k, v = inputs(kv_length)
    got = based_attention(q, k, v, causal=causal, block_size=8)
    assert_close(got, based_attention(q, k, v, causal=causal, implementation="reference"), jnp.float32)


def test_bfloat16_inputs_within_the_table():
    q, k, v = inputs(dtype=jnp.bfloat16)
    want = based_attention(*(x.astype(jnp.float32) for x in (q, k, v)), causal=True, implementation="reference")
    assert_close(based_attention(q, k, v, causal=True, block_size=16), want, jnp.bfloat16)


def test_gradients_and_jvp_match_the_reference():
    primals, tangents = inputs(), inputs(seed=1)
    cotangent = jax.random.normal(jax.random.key(9), (B, T, N, V))

    def loss(implementation):
        return lambda *a: jnp.sum(cotangent * based_attention(*a, causal=True, block_size=8,
                                                               implementation=implementation))

    for name, g, w in zip(("query", "key", "value"), jax.grad(loss("chunked"), (0, 1, 2))(*primals),
                          jax.grad(loss("reference"), (0, 1, 2))(*primals)):
        assert_close(g, w, jnp.float32, "gradient", what=name)
    _, got = jax.jvp(lambda *a: based_attention(*a, causal=True, block_size=8), primals, tangents)
    _, want = jax.jvp(lambda *a: based_attention(*a, causal=True, implementation="reference"), primals, tangents)
    assert_close(got, want, jnp.float32, "gradient", what="jvp")


def test_cache_decode_equals_the_last_rows():
    q, k, v = inputs()
    full = based_attention(q, k, v, causal=True)
    cache_k = jnp.zeros((B, T + 2, K, H)).at[:, :T].set(k)
    cache_v = jnp.zeros((B, T + 2, K, V)).at[:, :T].set(v)
    rows = based_decode(q[:, T - 3 :], cache_k, cache_v, query_positions=jnp.arange(T - 3, T))
    assert_close(rows, full[:, T - 3 :], jnp.float32)
    assert attnx.get_attention("based").decode is based_decode


def test_bad_arguments_are_named():
    q, k, v = inputs(S)
    with pytest.raises(ValueError, match="causal attention needs self attention"):
        based_attention(q, k, v, causal=True)
    with pytest.raises(ValueError, match="implementation: 'fast'; allowed"):
        based_attention(q, k, v, implementation="fast")
    with pytest.raises(ValueError, match="block_size: expected an int >= 1"):
        based_attention(q, k, v, block_size=-1)
