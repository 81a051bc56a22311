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
