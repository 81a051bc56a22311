"""DependencyViT reversed attention (spec vision_mechanisms.md §7(e)): the chunked fast path against the reference
(forward and gradients), unit gates give the transposed forward attention with unit outgoing mass per child, the
gated mass, permutation equivariance, the dependency mask, pruning, the gate modules' formulas, and refusals."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.special import erf

import attnx
from attnx.ops.dependency.reversed import (dependency_mask, head_selector, lite_token_counts, message_controller,
                                           prune_tokens, received_mass, reversed_attention, reversed_reference)
from attnx.testing.tolerances import assert_close

B, T, N, K, H, V = 2, 7, 4, 2, 8, 6


def inputs(seed=0):
    ks = jax.random.split(jax.random.key(seed), 5)
    q = jax.random.normal(ks[0], (B, T, N, H))
    k = jax.random.normal(ks[1], (B, T, K, H))
    v = jax.random.normal(ks[2], (B, T, K, V))
    p = jax.nn.softmax(jax.random.normal(ks[3], (B, T, N)) / 0.5, axis=-1)
    m = jax.nn.sigmoid(jax.random.normal(ks[4], (B, T)))
    return q, k, v, p, m


def forward_map(q, k):
    """numpy A^F [B, N, T(child j), T(parent i)], key heads shared by groups of N // K query heads."""
    q, k = np.asarray(q, np.float64), np.repeat(np.asarray(k, np.float64), N // K, axis=2)
    logits = np.einsum("bjnh,binh->bnji", q, k) / np.sqrt(H)
    e = np.exp(logits - logits.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def test_chunked_fast_path_matches_the_reference_forward_and_gradients():
    q, k, v, p, m = inputs()

    @jax.jit
    def run(q, k, v, p, m):
        loss = lambda f: lambda *a: jnp.sum(jnp.sin(f(*a[:3], head_gates=a[3], messages=a[4])))
        fast = lambda *a, **kw: reversed_attention(*a, block_size=3, **kw)  # 3 blocks, the last one padded
        return (fast(q, k, v, head_gates=p, messages=m), reversed_reference(q, k, v, head_gates=p, messages=m),
                jax.grad(loss(fast), range(5))(q, k, v, p, m), jax.grad(loss(reversed_reference), range(5))(q, k, v, p, m))

    blocked, reference, grads, want = run(q, k, v, p, m)
    assert_close(blocked, reference, jnp.float32)  # one-block runs: the tests below (block_size >= T)
    for g, w in zip(grads, want):
        assert_close(g, w, jnp.float32, kind="gradient")


# One compiled forward for the property tests below: values of width T, so one-hot "child name" values fit it.
FORWARD = jax.jit(lambda q, k, v, p, m: reversed_attention(q, k, v, head_gates=p, messages=m, block_size=4))


def test_unit_gates_give_the_transposed_forward_attention_and_each_child_sends_its_gate_mass():
    q, k, _, p, m = inputs(1)
    # Values that name their child: v_j = e_j (one-hot over positions), so out[i, h, j] is the weight child j sends
    # to parent i in head h; the output is linear in v, so this map is the whole mechanism for these q, k, p, m.
    onehot = jnp.broadcast_to(jnp.eye(T)[None, :, None, :], (B, T, K, T))
    weights = np.asarray(FORWARD(q, k, onehot, jnp.ones((B, T, N)), jnp.ones((B, T))))
    gated = np.asarray(FORWARD(q, k, onehot, p, m))
    A = forward_map(q, k)
    np.testing.assert_allclose(weights, np.transpose(A, (0, 3, 1, 2)), atol=2e-6)  # out = A^F^T V: [B, i, N, j]
    np.testing.assert_allclose(weights.sum(1), 1.0, atol=1e-5)  # each child's weights over parents sum to 1
    # Gated: child j sends p_{h,j} m_j in all; over heads (p is a softmax over heads) that is m_j.
    np.testing.assert_allclose(gated.sum(1), np.swapaxes(np.asarray(p * m[..., None]), 1, 2), atol=1e-5)
    np.testing.assert_allclose(gated.sum((1, 2)), np.asarray(m), atol=1e-5)


def test_permuting_the_tokens_permutes_the_output():
    q, k, _, p, m = inputs(2)
    v = jax.random.normal(jax.random.key(7), (B, T, K, T))
    perm = np.random.default_rng(0).permutation(T)
    out = FORWARD(q, k, v, p, m)
    permuted = FORWARD(q[:, perm], k[:, perm], v[:, perm], p[:, perm], m[:, perm])
    assert_close(permuted, out[:, perm], jnp.float32)


def test_dependency_mask_sums_the_gated_transposed_maps_over_heads():
    q, k, _, p, m = inputs(3)
    mask = np.asarray(dependency_mask(q, k, head_gates=p, messages=m))
    want = np.einsum("bnji,bjn,bj->bij", forward_map(q, k), np.asarray(p), np.asarray(m))
    np.testing.assert_allclose(mask, want, atol=2e-6)
    np.testing.assert_allclose(mask.sum(-2), np.asarray(m), atol=1e-5)  # child j sends m_j in all
    np.testing.assert_allclose(np.asarray(received_mass(mask)), want.sum(-1), atol=1e-5)


def test_pruning_gathers_exactly_the_top_scores_in_token_order():
    tokens = jax.random.normal(jax.random.key(4), (B, T, 3))
    score = jnp.asarray(np.random.default_rng(1).permutation(B * T).reshape(B, T), jnp.float32)
    kept, index = jax.jit(prune_tokens, static_argnums=2)(tokens, score, 4)
    for b in range(B):
        want = np.sort(np.argsort(-np.asarray(score[b]))[:4])
        np.testing.assert_array_equal(np.asarray(index[b]), want)
        np.testing.assert_array_equal(np.asarray(kept[b]), np.asarray(tokens[b])[want])
    with pytest.raises(ValueError, match="prune_tokens.keep"):
        prune_tokens(tokens, score, T + 1)


def test_lite_token_counts_follow_the_port():
    # floor(f_i * current), f_i = (1 - i r) / (1 - (i - 1) r): about r of the original 196 tokens go each step.
    assert lite_token_counts(196, 4, 0.16) == (196, 164, 132, 100, 69)
    assert lite_token_counts(16, 3, 0.16) == (16, 13, 10, 7)
    with pytest.raises(ValueError, match="lite_keep_fraction.ratio"):
        lite_token_counts(196, 4, 0.25)  # 4 steps of 0.25 would remove every token


def test_head_selector_and_message_controller_formulas():
    rng = np.random.default_rng(5)
    x, w_p = rng.standard_normal((B, T, 8)), rng.standard_normal((8, N))
    w_1, w_2 = rng.standard_normal((8, 4)), rng.standard_normal((4, 1))
    p = np.asarray(head_selector(jnp.asarray(x), jnp.asarray(w_p)))
    logits = x @ w_p / 0.1
    e = np.exp(logits - logits.max(-1, keepdims=True))
    np.testing.assert_allclose(p, e / e.sum(-1, keepdims=True), atol=1e-5)
    h = x @ w_1
    gelu = 0.5 * h * (1 + erf(h / np.sqrt(2)))  # exact GELU, as torch's nn.GELU
    want = 1 / (1 + np.exp(-(gelu @ w_2)[..., 0]))
    np.testing.assert_allclose(np.asarray(message_controller(jnp.asarray(x), jnp.asarray(w_1), jnp.asarray(w_2))),
                               want, atol=1e-5)
    with pytest.raises(ValueError, match="reversed.temperature"):
        head_selector(jnp.asarray(x), jnp.asarray(w_p), temperature=0.0)


def test_refusals_name_the_argument():
    q, k, v, p, m = inputs()
    with pytest.raises(ValueError, match="causal=True is not supported"):
        reversed_attention(q, k, v, causal=True)
    with pytest.raises(ValueError, match="must equal key length"):
        reversed_attention(q[:, :5], k, v)
    with pytest.raises(ValueError, match="reversed.head_gates"):
        reversed_attention(q, k, v, head_gates=p[..., :2])
    with pytest.raises(ValueError, match="reversed.messages"):
        reversed_reference(q, k, v, messages=m[:, :3])
    with pytest.raises(ValueError, match="reversed.block_size"):
        reversed_attention(q, k, v, block_size=0)
    spec = attnx.get_attention("reversed")
    assert spec.patterns == frozenset({"NS"}) and attnx.get_attention("dependencyvit") is spec
