"""Conditional cross attention (spec vision_mechanisms.md §9(e)): batched conditions equal a per-condition loop, the
embedding is invariant to permuting the image tokens, the formula against numpy, the core against its reference,
and the refusals."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import attnx
from attnx.ops.conditional.conditional import (condition_tokens, conditional_cross, conditional_cross_attention,
                                               conditional_cross_reference)
from attnx.testing.tolerances import assert_close

B, P, D, N, H, V, NUM_CONDITIONS, C = 2, 6, 8, 2, 4, 3, 5, 3


def weights(seed=0):
    ks = jax.random.split(jax.random.key(seed), 6)
    return dict(condition_table=jax.random.normal(ks[0], (NUM_CONDITIONS, D)),
                query_weight=jax.random.normal(ks[1], (D, N, H)) / np.sqrt(D),
                key_weight=jax.random.normal(ks[2], (D, N, H)) / np.sqrt(D),
                value_weight=jax.random.normal(ks[3], (D, N, V)) / np.sqrt(D),
                out_weight=jax.random.normal(ks[4], (N, V, D)) / np.sqrt(N * V))


def numpy_embedding(tokens, condition, w):
    w = {name: np.asarray(a, np.float64) for name, a in w.items()}
    t = np.eye(NUM_CONDITIONS)[condition] @ w["condition_table"]  # one-hot -> linear
    q = np.einsum("d,dnh->nh", t, w["query_weight"])
    k = np.einsum("pd,dnh->pnh", tokens, w["key_weight"])
    v = np.einsum("pd,dnv->pnv", tokens, w["value_weight"])
    logits = np.einsum("nh,pnh->np", q, k) / np.sqrt(H)
    a = np.exp(logits - logits.max(-1, keepdims=True))
    a /= a.sum(-1, keepdims=True)
    return np.einsum("np,pnv,nvd->d", a, v, w["out_weight"])


def test_batched_conditions_equal_the_loop_the_formula_and_are_permutation_invariant():
    w = weights()
    tokens = np.random.default_rng(1).standard_normal((B, P, D)).astype(np.float32)
    ids = np.asarray([[0, 3, 4], [2, 2, 1]])
    perm = np.random.default_rng(0).permutation(P)
    embed = jax.jit(lambda tokens, ids: conditional_cross_attention(tokens, ids, **w))
    # The permuted images ride in the same batch: one compiled call for both (numpy inputs: no eager ops).
    both = np.asarray(embed(np.concatenate([tokens, tokens[:, perm]]), np.concatenate([ids, ids])))
    batched, permuted = both[:B], both[B:]
    assert batched.shape == (B, C, D)
    for c in range(C):  # ids [2B]: one condition per image -> [2B, D], one call per condition (one compile)
        one = np.asarray(embed(np.concatenate([tokens, tokens]), np.concatenate([ids[:, c], ids[:, c]])))[:B]
        np.testing.assert_allclose(batched[:, c], one, atol=2e-5, rtol=2e-5)
        for b in range(B):
            want = numpy_embedding(tokens[b].astype(np.float64), int(ids[b, c]), w)
            np.testing.assert_allclose(batched[b, c], want, atol=2e-5, rtol=2e-5)
    np.testing.assert_allclose(permuted, batched, atol=2e-5, rtol=2e-5)
    # The same condition twice gives the same embedding; different conditions differ.
    np.testing.assert_allclose(batched[1, 0], batched[1, 1], atol=1e-6)
    assert np.abs(batched[0, 0] - batched[0, 1]).max() > 1e-3
    np.testing.assert_array_equal(np.asarray(condition_tokens(jnp.asarray(ids), w["condition_table"])),
                                  np.asarray(w["condition_table"])[ids])


def test_core_matches_its_reference():
    # The core is softmax attention's fast path (its gradients are the softmax conformance suite's to test).
    ks = jax.random.split(jax.random.key(2), 3)
    q, k, v = (jax.random.normal(ks[0], (B, C, 4, H)), jax.random.normal(ks[1], (B, P, 2, H)),
               jax.random.normal(ks[2], (B, P, 2, V)))
    out, reference = jax.jit(lambda *a: (conditional_cross(*a), conditional_cross_reference(*a)))(q, k, v)
    assert_close(out, reference, jnp.float32)


def test_refusals_name_the_argument():
    w = weights()
    tokens = jnp.zeros((B, P, D))
    x = jnp.zeros((B, P, 2, H))
    with pytest.raises(ValueError, match="causal=True is not supported"):
        conditional_cross(x[:, :2], x, x, causal=True)
    with pytest.raises(ValueError, match="cross attention only"):
        conditional_cross(x, x, x)
    with pytest.raises(ValueError, match="conditional_cross.condition_ids"):
        conditional_cross_attention(tokens, jnp.zeros((B + 1, 2), jnp.int32), **w)
    with pytest.raises(ValueError, match="conditional_cross.condition_ids"):
        conditional_cross_attention(tokens, jnp.zeros((B,)), **w)
    assert attnx.get_attention("conditional_cross").patterns == frozenset({"NC"})
