"""MQSA (spec llm_mechanisms.md §13): the causal window mean of the queries, the alpha = 0 / 1 limits (one branch),
window 1 = plain softmax attention, and the fast path against the loop oracle with gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import attnx
from attnx.ops.pooled.mqsa import mqsa_attention, mqsa_reference, query_window_pool
from attnx.testing.tolerances import assert_close

B, T, S, N, K, H = 2, 7, 9, 4, 2, 8


def qkv(s=T):
    keys = jax.random.split(jax.random.key(0), 3)
    return (jax.random.normal(keys[0], (B, T, N, H)), jax.random.normal(keys[1], (B, s, K, H)),
            jax.random.normal(keys[2], (B, s, K, H)))


def test_pooling_is_the_mean_of_the_last_window_queries():
    q, _, _ = qkv()
    pooled = np.asarray(jax.jit(query_window_pool, static_argnums=1)(q, 3))
    x = np.asarray(q)
    for t in range(T):
        np.testing.assert_allclose(pooled[:, t], x[:, max(0, t - 2):t + 1].mean(1), rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(query_window_pool(q, 1)), x)


def test_alpha_limits_window_one_and_the_loop_oracle_with_gradients():
    q, k, v = qkv(S)
    softmax = attnx.get_attention("softmax").fn

    @jax.jit
    def run(q, k, v):
        fn = lambda **kw: mqsa_attention(q, k, v, causal=True, long_window=4, short_window=2, **kw)
        branch = lambda w: softmax(query_window_pool(q, w), k, v, causal=True)
        loss = lambda f: lambda q, k, v: jnp.sum(jnp.sin(f(q, k, v, causal=True, long_window=4, short_window=2,
                                                           alpha=0.3)))
        return (fn(alpha=1.0), branch(4), fn(alpha=0.0), branch(2),
                mqsa_attention(q, k, v, long_window=1, short_window=1), softmax(q, k, v),
                fn(alpha=0.3), mqsa_reference(q, k, v, causal=True, long_window=4, short_window=2, alpha=0.3),
                jax.grad(loss(mqsa_attention), (0, 1, 2))(q, k, v), jax.grad(loss(mqsa_reference), (0, 1, 2))(q, k, v))

    (long_only, long_branch, short_only, short_branch, window_one, plain, mixed, oracle, grads,
     want_grads) = run(q, k, v)
    assert_close(long_only, long_branch, jnp.float32)
    assert_close(short_only, short_branch, jnp.float32)
    assert_close(window_one, plain, jnp.float32)
    assert_close(mixed, oracle, jnp.float32)
    assert_close(mixed, 0.3 * long_branch + 0.7 * short_branch, jnp.float32)
    for g, w in zip(grads, want_grads):
        assert_close(g, w, jnp.float32, kind="gradient")


def test_bad_arguments_are_named():
    q, k, v = qkv()
    with pytest.raises(ValueError, match="mqsa.long_window"):
        mqsa_attention(q, k, v, long_window=0)
    with pytest.raises(ValueError, match="mqsa.alpha"):
        mqsa_attention(q, k, v, alpha=1.5)
    assert attnx.get_attention("mqsa").decode is None  # pooled queries need past queries, not in a KV cache
