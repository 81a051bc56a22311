"""MoH gates (spec llm_mechanisms.md §1 (e)): MHA limits, the uniform-router balance loss, exactly k routed heads,
the official code's gate scaling, and the parameter-free variant."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnx.ops.heads.moh import apply_head_gates, moh_gates, moh_param_free_gates

B, T, D, N = 2, 7, 12, 6


def x_and_weights(n_shared, seed=0):
    keys = jax.random.split(jax.random.key(seed), 4)
    x = jax.random.normal(keys[0], (B, T, D))
    return (x, jax.random.normal(keys[1], (D, N - n_shared)), jax.random.normal(keys[2], (D, n_shared)),
            jax.random.normal(keys[3], (D, 2)))


def test_all_shared_with_a_zero_router_is_exactly_mha():
    x, _, shared, _ = x_and_weights(N)
    gates, aux = moh_gates(x, None, jnp.zeros_like(shared), None, num_heads=N, n_shared=N, top_k=0)
    np.testing.assert_allclose(gates, 1.0, rtol=1e-6)
    out = jax.random.normal(jax.random.key(3), (B, T, N, 5))
    np.testing.assert_allclose(apply_head_gates(out, gates), out, rtol=1e-6)


def test_every_head_routed_with_zero_routers_is_exactly_mha():
    x, routed, shared, mix = x_and_weights(2)
    zeros = [jnp.zeros_like(w) for w in (routed, shared, mix)]
    gates, _ = moh_gates(x, *zeros, num_heads=N, n_shared=2, top_k=N - 2)
    np.testing.assert_allclose(gates, 1.0, rtol=1e-6)


def test_uniform_router_gives_balance_loss_k_and_exactly_k_routed_heads_are_on():
    x, routed, shared, mix = x_and_weights(2)
    _, aux = moh_gates(x, jnp.zeros_like(routed), shared, mix, num_heads=N, n_shared=2, top_k=3)
    np.testing.assert_allclose(aux["balance_loss"], 3.0, rtol=1e-6)
    gates, aux = moh_gates(x, routed, shared, mix, num_heads=N, n_shared=2, top_k=3)
    np.testing.assert_array_equal(np.count_nonzero(np.asarray(gates[..., 2:]), axis=-1), 3)
    np.testing.assert_array_equal(aux["routed_mask"].sum(-1), 3)
    assert np.all(np.asarray(gates[..., :2]) > 0)


def test_gate_scaling_follows_the_official_code():
    x, routed, shared, mix = x_and_weights(2)
    gates, _ = moh_gates(x, routed, shared, mix, num_heads=N, n_shared=2, top_k=3)
    p = jax.nn.softmax(x @ routed, -1)
    keep = np.asarray(jax.lax.top_k(p, 3)[1])
    mask = np.zeros(p.shape)
    np.put_along_axis(mask, keep, 1.0, -1)
    routed_gates = 3 * p * mask / np.sum(p * mask, -1, keepdims=True)
    alpha = 2 * jax.nn.softmax(x @ mix, -1)
    expected = np.concatenate([alpha[..., :1] * 2 * jax.nn.softmax(x @ shared, -1), alpha[..., 1:] * routed_gates], -1)
    np.testing.assert_allclose(gates, expected, rtol=1e-5, atol=1e-6)
    # No shared heads: the routed gates alone; one shared head: its gate is 1 before mixing.
    only_routed, _ = moh_gates(x, jax.random.normal(jax.random.key(5), (D, N)), None, None, num_heads=N, n_shared=0,
                               top_k=2)
    np.testing.assert_allclose(only_routed.sum(-1), 2.0, rtol=1e-5)


def test_param_free_gates_are_binary_and_pick_the_largest_query_norms():
    query = jax.random.normal(jax.random.key(4), (B, T, N, 8))
    gates = moh_param_free_gates(query, n_shared=2, top_k=2)
    assert set(np.unique(np.asarray(gates))) <= {0.0, 1.0}
    np.testing.assert_array_equal(gates[..., :2], 1.0)
    norms = np.linalg.norm(np.asarray(query[..., 2:, :]), axis=-1)
    top = np.argsort(-norms, axis=-1)[..., :2]
    expected = np.zeros(norms.shape)
    np.put_along_axis(expected, top, 1.0, -1)
    np.testing.assert_array_equal(gates[..., 2:], expected)


@pytest.mark.parametrize("n_shared, top_k, message", [
    (7, 0, "n_shared: expected 0 <= n_shared <= num_heads=6"),
    (2, 5, "top_k: expected 0 <= top_k <= 4 routed heads"),
    (0, 0, "switch every head off"),
])
def test_bad_counts_are_named(n_shared, top_k, message):
    x, routed, shared, mix = x_and_weights(2)
    with pytest.raises(ValueError, match=message):
        moh_gates(x, routed, shared, mix, num_heads=N, n_shared=n_shared, top_k=top_k)
