"""Performer / FAVOR+: prefix-sum form = quadratic form, the estimate converges to softmax attention as features
grow (unbiased orthogonal features), gradients, the cached decode rule, errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import attnx
from attnx.ops.linear.performer import orthogonal_features, performer_attention, performer_decode
from attnx.testing.tolerances import assert_close

B, T, S, N, K, H, V = 2, 37, 23, 6, 2, 8, 5


def inputs(kv_length=T, scale=1.0, seed=0):
    kq, kk, kv = jax.random.split(jax.random.key(seed), 3)
    return (scale * jax.random.normal(kq, (B, T, N, H)), scale * jax.random.normal(kk, (B, kv_length, K, H)),
            jax.random.normal(kv, (B, kv_length, K, V)))


@pytest.mark.parametrize("causal, kv_length", [(True, T), (False, T), (False, S)], ids=["CS", "NS", "NC"])
def test_chunked_equals_quadratic(causal, kv_length):
    q, k, v = inputs(kv_length)
    assert_close(performer_attention(q, k, v, causal=causal, block_size=8),
                 performer_attention(q, k, v, causal=causal, implementation="reference"), jnp.float32)


# Slow (~24 s): a statistical check over many feature counts; the estimator's paths are checked against the
# reference in the default tests.
@pytest.mark.slow
def test_orthogonal_blocks_and_convergence_to_softmax():
    w = orthogonal_features(jax.random.key(0), 20, H)
    gram = np.asarray(w[:H] @ w[:H].T)
    np.testing.assert_allclose(gram - np.diag(np.diag(gram)), 0, atol=1e-4)  # orthogonal within a block
    q, k, v = inputs(scale=0.5)
    exact = attnx.dot_product_attention(q, k, v, mask=attnx.Mask(causal=True))
    errors = [float(jnp.mean(jnp.abs(performer_attention(q, k, v, causal=True, num_features=m, seed=1) - exact)))
              for m in (64, 16384)]
    assert errors[1] < 0.25 * errors[0] and errors[1] < 0.005, errors


def test_gradients_match_the_reference():
    primals = inputs()
    cotangent = jax.random.normal(jax.random.key(9), (B, T, N, V))

    def loss(implementation):
        return lambda *a: jnp.sum(cotangent * performer_attention(*a, causal=True, block_size=8,
                                                                  implementation=implementation))

    for name, g, w in zip(("query", "key", "value"), jax.grad(loss("chunked"), (0, 1, 2))(*primals),
                          jax.grad(loss("reference"), (0, 1, 2))(*primals)):
        assert_close(g, w, jnp.float32, "gradient", what=name)


def test_cache_decode_equals_the_last_rows():
    q, k, v = inputs()
    full = performer_attention(q, k, v, causal=True)
    cache_k = jnp.zeros((B, T + 2, K, H)).at[:, :T].set(k)
    cache_v = jnp.zeros((B, T + 2, K, V)).at[:, :T].set(v)
    rows = performer_decode(q[:, T - 3 :], cache_k, cache_v, query_positions=jnp.arange(T - 3, T))
    assert_close(rows, full[:, T - 3 :], jnp.float32)


def test_bad_arguments_are_named():
    q, k, v = inputs(S)
    with pytest.raises(ValueError, match="causal attention needs self attention"):
        performer_attention(q, k, v, causal=True)
    with pytest.raises(ValueError, match=r"features: expected \[m, H\] with H = 8"):
        performer_attention(q, k, v, features=jnp.ones((4, 3)))
    with pytest.raises(ValueError, match="num_features: expected an int >= 1"):
        performer_attention(q, k, v, num_features=0)
