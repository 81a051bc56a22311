"""BAM soft Mixture of Attention experts (spec llm_mechanisms.md §11 (e)): E = 1 is dense attention, identical
experts make the mixed output router-invariant, the KV-shared variant attends every expert to the same keys and
values, and the regrouped fast path equals one core call per expert (forward, gradients, decode)."""

import jax
import jax.numpy as jnp
import pytest

import attnx
from attnx.testing.tolerances import assert_close

B, T, S, N, K, H, E = 2, 5, 7, 4, 2, 8, 2
SPEC = attnx.get_attention("moa_experts")


def inputs(n=N, k=K, s=S, seed=0):
    keys = jax.random.split(jax.random.key(seed), 4)
    return (jax.random.normal(keys[0], (B, T, n, H)), jax.random.normal(keys[1], (B, s, k, H)),
            jax.random.normal(keys[2], (B, s, k, H)), jax.nn.softmax(jax.random.normal(keys[3], (B, T, E)), -1))


def expert_sum(out):
    """sum_e over the expert-major heads: what the output projection sees when every expert's W_O is the same."""
    return out.reshape(*out.shape[:-2], E, -1, out.shape[-1]).sum(-3)


@jax.jit
def _cases(q, k, v, gates, other_gates):
    fn = lambda **kw: SPEC.fn(q, k, v, causal=True, **kw)
    dense = attnx.get_attention("softmax").fn(q, k, v, causal=True)
    single = fn(num_experts=1, gates=jnp.ones((B, T, 1)))
    same_q = jnp.concatenate([q[..., :2, :]] * E, -2)
    same_kv = [jnp.concatenate([x[..., :1, :]] * E, -2) for x in (k, v)]
    identical = [expert_sum(SPEC.fn(same_q, *same_kv, causal=True, num_experts=E, gates=g))
                 for g in (gates, other_gates)]
    return dense, single, identical


def test_one_expert_is_dense_and_identical_experts_are_router_invariant():
    q, k, v, gates = inputs(s=T)
    other = jax.nn.softmax(3.0 * jax.random.normal(jax.random.key(9), (B, T, E)), -1)
    dense, single, (a, b) = _cases(q, k, v, gates, other)
    assert_close(single, dense, jnp.float32)
    assert_close(a, b, jnp.float32)
    assert float(jnp.max(jnp.abs(a))) > 0.1  # not trivially zero


@pytest.mark.parametrize("kv_shared", [False, True])
def test_fast_path_equals_one_call_per_expert_with_gradients(kv_shared):
    n, k = (4, 2) if not kv_shared else (4, 1)  # shared: each expert's 2 query heads share 1 key/value head
    q, key, v, gates = inputs(n, k)

    def loss(fn):
        return lambda q, key, v, g: jnp.sum(jnp.sin(fn(q, key, v, causal=True, gates=g, num_experts=E,
                                                       kv_shared=kv_shared)))

    @jax.jit
    def run(q, key, v, g):
        return [(f(q, key, v, causal=False, gates=g, num_experts=E, kv_shared=kv_shared),
                 jax.grad(loss(f), argnums=(0, 1, 2, 3))(q, key, v, g)) for f in (SPEC.fn, SPEC.reference)]

    (got, grads), (want, want_grads) = run(q, key, v, gates)
    assert_close(got, want, jnp.float32)
    for g, w in zip(grads, want_grads):
        assert_close(g, w, jnp.float32, kind="gradient")


def test_kv_shared_is_full_experts_with_copied_keys_and_values():
    q, k, v, gates = inputs(4, 1)
    shared, full = jax.jit(lambda q, k, v, g: (
        SPEC.fn(q, k, v, gates=g, num_experts=E, kv_shared=True),
        SPEC.fn(q, jnp.repeat(k, E, -2), jnp.repeat(v, E, -2), gates=g, num_experts=E)))(q, k, v, gates)
    assert_close(shared, full, jnp.float32)


def test_cache_decode_equals_the_last_rows():
    q, k, v, gates = inputs(s=T)
    cache_k = jnp.zeros((B, T + 2, K, H)).at[:, :T].set(k)
    cache_v = jnp.zeros((B, T + 2, K, H)).at[:, :T].set(v)
    full, rows = jax.jit(lambda: (SPEC.fn(q, k, v, causal=True, gates=gates, num_experts=E),
                                  SPEC.decode(q[:, T - 2:], cache_k, cache_v, query_positions=jnp.arange(T - 2, T),
                                              gates=gates[:, T - 2:], num_experts=E)))()
    assert_close(rows, full[:, T - 2:], jnp.float32)


def test_bad_arguments_are_named():
    q, k, v, _ = inputs()
    with pytest.raises(ValueError, match="moa_experts.num_experts: the 4 query heads"):
        SPEC.fn(q, k, v, num_experts=3)
    with pytest.raises(ValueError, match="key/value heads must split evenly"):
        SPEC.fn(q, k[..., :1, :], v[..., :1, :], num_experts=2)
    with pytest.raises(ValueError, match="moa_experts.kv_shared"):
        SPEC.fn(q, jnp.concatenate([k] * 2, -2)[..., :3, :], jnp.concatenate([v] * 2, -2)[..., :3, :],
                num_experts=2, kv_shared=True)
    with pytest.raises(ValueError, match=r"moa_experts.gates: expected shape"):
        SPEC.fn(q, k, v, num_experts=2, gates=jnp.ones((B, T, 3)))


# ---- BAM's top-k FFN experts (attnx.ops.experts.ffn) ----


def test_top_k_routing_gates_and_balance_loss_by_hand():
    import numpy as np

    from attnx.ops.experts.ffn import top_k_routing

    logits = np.array([[2.0, 1.0, 0.0, -1.0], [0.0, 3.0, 1.0, 2.0], [1.0, 0.0, 2.0, 0.5]], np.float32)
    gates, balance = top_k_routing(jnp.asarray(logits), 2)
    expected = np.zeros_like(logits)
    probability = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    share = np.zeros(4)
    for row, chosen in enumerate([(0, 1), (1, 3), (2, 0)]):
        top = np.exp(logits[row, list(chosen)])
        expected[row, list(chosen)] = top / top.sum()
        share[list(chosen)] += 1 / (3 * 2)
    assert_close(gates, expected, jnp.float32)
    assert_close(balance, 4 * np.sum(share * probability.mean(0)), jnp.float32)
    full, _ = top_k_routing(jnp.asarray(logits), 4)  # k = E: the plain softmax
    assert_close(full, probability, jnp.float32)
    with pytest.raises(ValueError, match="top_k: expected an int in \\[1, 4\\].*got 5"):
        top_k_routing(jnp.asarray(logits), 5)


def test_expert_ffn_equals_the_loop_over_experts_forward_and_gradients():
    from attnx.ops.experts.ffn import expert_ffn, expert_ffn_reference, top_k_routing

    keys = jax.random.split(jax.random.key(7), 4)
    x = jax.random.normal(keys[0], (2, 3, 8))
    gate_up = jax.random.normal(keys[1], (3, 8, 2, 6)) * 0.3
    down = jax.random.normal(keys[2], (3, 6, 8)) * 0.3
    router = jax.random.normal(keys[3], (8, 3))

    def loss(fn, x, gate_up, down, router):
        gates, _ = top_k_routing(x @ router, 2)
        return jnp.sum(jnp.sin(fn(x, gate_up, down, gates)))

    fast = jax.jit(jax.value_and_grad(lambda *a: loss(expert_ffn, *a), argnums=(0, 1, 2, 3)))(x, gate_up, down, router)
    ref = jax.jit(jax.value_and_grad(lambda *a: loss(expert_ffn_reference, *a), argnums=(0, 1, 2, 3)))(
        x, gate_up, down, router)
    assert_close(fast[0], ref[0], jnp.float32)
    for got, want in zip(fast[1], ref[1]):
        assert_close(got, want, jnp.float32, kind="gradient")
    with pytest.raises(ValueError, match="expert_ffn: expected"):
        expert_ffn(x, gate_up, down[:, :, :4], jnp.ones((2, 3, 3)))
