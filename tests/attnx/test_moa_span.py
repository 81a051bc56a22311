"""MoA spans (spec llm_mechanisms.md §6 (e)): the sink + band rule, span >= T gives dense, sink = 0 gives a plain
sliding window, the chunked span-group path against the banded-mask reference (forward and gradients), the cached
decode rule, cache size = sum_h (G + S_h), attention influence against finite differences, plan loss and selection."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import attnx
from attnx.analysis import (aggregate_blocks, attention_influence, select_span_plan, span_config_grid, span_density,
                            span_plan_loss)
from attnx.ops.spans.moa import (moa_cache_sizes, moa_spans, sink_window_attention, sink_window_decode,
                                 sink_window_mask, sink_window_reference)
from attnx.testing.tolerances import assert_close

B, T, N, K, H, V = 2, 13, 4, 2, 8, 5
SPANS, SINK = (3, 3, 3, 6), 2  # span 3 holds heads 0, 1 (key head 0) and 2 (key head 1): an uneven GQA group
CHUNKED = attnx.Chunked(block_q=4, block_kv=4)


def inputs(seed=0, length=T):
    kq, kk, kv = jax.random.split(jax.random.key(seed), 3)
    return (jax.random.normal(kq, (B, length, N, H)), jax.random.normal(kk, (B, length, K, H)),
            jax.random.normal(kv, (B, length, K, V)))


def test_mask_is_the_sink_or_band_rule_and_cache_size_is_sum_of_sink_plus_span():
    spans, sink, length = (1, 2, 4, 7), 3, 12
    got = np.asarray(sink_window_mask(spans, sink, jnp.arange(length), length))
    for h, span in enumerate(spans):
        for i in range(length):
            for j in range(length):
                assert got[h, i, j] == (j <= i and (j < sink or i - j < span)), (h, i, j)
    sizes = moa_cache_sizes(spans, sink, length)
    assert list(got[:, -1].sum(-1)) == list(sizes)
    assert sum(sizes) == sum(sink + s for s in spans)  # length >= G + S_h for every head


def test_moa_spans_is_alpha_plus_beta_length_truncated_and_clipped():
    assert moa_spans([3.0, -100.0, 10.0, 1.0], [0.5, 0.125, 1.0, 0.0], 64) == (35, 1, 64, 1)
    with pytest.raises(ValueError, match="alpha and beta"):
        moa_spans([1.0, 2.0], [0.5], 64)


@functools.partial(jax.jit, static_argnames=("implementation",))
def _loss_and_grads(q, k, v, cotangent, implementation):
    def loss(q, k, v):
        if implementation == "reference":
            out = sink_window_reference(q, k, v, spans=SPANS, sink=SINK)
        else:
            out = sink_window_attention(q, k, v, spans=SPANS, sink=SINK, implementation=CHUNKED)
        return jnp.sum(out * cotangent), out

    (_, out), grads = jax.value_and_grad(loss, (0, 1, 2), has_aux=True)(q, k, v)
    return out, grads


def test_chunked_span_groups_match_the_banded_reference_with_gradients():
    q, k, v = inputs()
    cotangent = jax.random.normal(jax.random.key(7), (B, T, N, V))
    out, grads = _loss_and_grads(q, k, v, cotangent, "chunked")
    want, want_grads = _loss_and_grads(q, k, v, cotangent, "reference")
    assert_close(out, want, jnp.float32)
    for name, g, w in zip("qkv", grads, want_grads):
        assert_close(g, w, jnp.float32, "gradient", what=name)
    # The reference really differs from dense causal attention (the band is narrower than T).
    dense = attnx.dot_product_attention(q, k, v, mask=attnx.Mask(causal=True), implementation="reference")
    assert float(jnp.max(jnp.abs(want - dense))) > 1e-2


def test_chunked_path_skips_the_blocks_between_sink_and_band():
    # The chunked implementation's block-liveness table for one span group (8 x 8 blocks of 8): the sink column,
    # the diagonal and the block below it stay; the 15 causal blocks in between are never computed.
    from attnx.ops.softmax import chunked
    from attnx.ops.spans.moa import _group_rule
    from attnx.validation import canonicalize

    x = jnp.zeros((1, 64, 2, 8))
    live = {}
    for span, sink in ((8, 8), (8, 0), (64, 8)):
        mask, mask_mod = _group_rule(span, sink, 64)
        args = canonicalize(x, x, x, mask=mask, mask_mod=mask_mod)
        geometry = chunked._geometry(args, attnx.Chunked(block_q=8, block_kv=8))
        live[span, sink] = int(np.asarray(chunked._live_table(geometry, args.mask, args.mask_mod)).sum())
    assert live == {(8, 8): 8 + 8 + 7 - 2, (8, 0): 8 + 7, (64, 8): 36}


# default-suite time budget: a limit case of the banded reference that the chunked-vs-banded test covers
@pytest.mark.slow
def test_span_at_least_length_gives_dense_causal_attention():
    q, k, v = inputs()
    dense = attnx.dot_product_attention(q, k, v, mask=attnx.Mask(causal=True), implementation="reference")
    assert_close(sink_window_attention(q, k, v, spans=(T, T + 5, T, 2 * T), sink=SINK), dense, jnp.float32)


def test_sink_zero_gives_a_plain_sliding_window():
    q, k, v = inputs()
    window = attnx.get_attention("sliding_window").reference
    got = sink_window_attention(q, k, v, spans=(4, 4, 5, 5), sink=0)
    for heads, w in (((0, 1), 4), ((2, 3), 5)):
        want = window(q, k, v, window=w, causal=True)
        assert_close(got[:, :, heads[0]:heads[1] + 1], want[:, :, heads[0]:heads[1] + 1], jnp.float32)


def test_decode_equals_the_last_rows_of_the_full_forward():
    q, k, v = inputs()
    full = sink_window_reference(q, k, v, spans=SPANS, sink=SINK)
    pad = lambda x: jnp.concatenate([x, 100.0 * jnp.ones((B, 3) + x.shape[2:])], axis=1)
    positions = jnp.arange(T - 3, T)
    got = sink_window_decode(q[:, -3:], pad(k), pad(v), query_positions=positions, spans=SPANS, sink=SINK)
    assert_close(got, full[:, -3:], jnp.float32)
    spec = attnx.get_attention("moa_span")
    assert spec.decode is sink_window_decode and spec.patterns == frozenset({"CS"})


def test_errors_name_the_argument():
    q, k, v = inputs()
    with pytest.raises(ValueError, match="causal=False"):
        sink_window_attention(q, k, v, spans=SPANS, causal=False)
    with pytest.raises(ValueError, match="self attention"):
        sink_window_attention(q, k[:, :5], v[:, :5], spans=SPANS)
    with pytest.raises(ValueError, match=r"moa_span.spans: expected 4 spans"):
        sink_window_attention(q, k, v, spans=(3, 3))
    with pytest.raises(ValueError, match=r"moa_span.sink"):
        sink_window_attention(q, k, v, spans=SPANS, sink=-1)


# ---- influence ---------------------------------------------------------------------------------------------------
L_T = 6


def _maps(seed=3):
    logits = jax.random.normal(jax.random.key(seed), (L_T, L_T)) * 1.5
    return jax.nn.softmax(jnp.where(jnp.tril(jnp.ones((L_T, L_T), bool)), logits, -jnp.inf), axis=-1)


_VALUES = np.random.default_rng(0).standard_normal((L_T, 3))
_WEIGHTS = np.random.default_rng(1).standard_normal((L_T, 3))


def _loss(a, xp):
    """A nonlinear loss of the attention output A @ V, written for jnp (gradients) and numpy float64 (differences)."""
    return xp.sum(_WEIGHTS * xp.tanh(a @ _VALUES))


def _removed(a, i, j, eps):
    """Row i moved a fraction eps of the way to 'A_ij removed, row renormalised' (eps = 1 removes it)."""
    a = a.copy()
    aij = a[i, j]
    a[i] *= 1.0 + eps * aij / (1.0 - aij)
    a[i, j] = (1.0 - eps) * aij
    return a


def test_influence_matches_the_finite_difference_loss_change():
    a = _maps()
    effect = np.asarray(attention_influence(a, jax.grad(lambda m: _loss(m, jnp))(a)))
    a64 = np.asarray(a, np.float64)
    eps = 1e-4
    for i in range(1, L_T):
        for j in range(i + 1):
            fd = (_loss(_removed(a64, i, j, eps), np) - _loss(_removed(a64, i, j, -eps), np)) / (2 * eps)
            np.testing.assert_allclose(effect[i, j], fd, rtol=1e-4, atol=1e-6, err_msg=f"({i}, {j})")
    # For a loss linear in A the first-order change is exact: removing A_ij changes the loss by exactly E_ij.
    g = np.asarray(jax.random.normal(jax.random.key(4), (L_T, L_T)), np.float64) * np.tril(np.ones((L_T, L_T)))
    linear = np.asarray(attention_influence(a, jnp.asarray(g, jnp.float32)))
    for i, j in ((3, 1), (5, 5), (4, 0)):
        exact = np.sum(g * _removed(a64, i, j, 1.0)) - np.sum(g * a64)
        np.testing.assert_allclose(linear[i, j], exact, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(effect[0], -np.asarray(a[0] * jax.grad(lambda m: _loss(m, jnp))(a)[0]), rtol=1e-6)


def test_block_aggregation_and_plan_loss():
    x = jax.random.uniform(jax.random.key(5), (2, 3, 10, 10))
    blocks = aggregate_blocks(x, 4)
    assert blocks.shape == (2, 3, 3, 3)
    np.testing.assert_allclose(blocks[1, 2, 1, 2], x[1, 2, 4:8, 8:].sum(), rtol=1e-5)
    np.testing.assert_allclose(blocks.sum(), x.sum(), rtol=1e-5)
    influence = x.reshape(2, 3, 10, 10)  # [samples, N, T, T]
    assert np.all(np.asarray(span_plan_loss(influence, [10.0] * 3, [0.0] * 3, sink=0)) == 0)  # dense plan
    loss = np.asarray(span_plan_loss(influence, [2.0, 0.0, 1.0], [0.0, 0.5, 0.0], sink=1))
    total = np.asarray(x).sum(0)
    for h, span in enumerate((2, 5, 1)):
        want = sum(total[h, i, j] for i in range(10) for j in range(i + 1) if not (j < 1 or i - j < span))
        np.testing.assert_allclose(loss[h], want, rtol=1e-5)


def test_greedy_plan_gives_the_long_span_to_the_head_that_needs_it():
    # Head 0's influence sits far from the diagonal, head 1's next to it: under a tight density bound the greedy
    # plan must spend the density on head 0 and beat every uniform plan that fits the bound.
    influences = {}
    for length in (16, 32):
        i, j = np.tril_indices(length)
        far, near = np.zeros((length, length)), np.zeros((length, length))
        far[i, j] = (i - j) / length
        near[i, j] = (i - j <= 1)
        influences[length] = jnp.asarray(np.stack([far, near])[None], jnp.float32)
    configs = span_config_grid(min_length=16, max_length=32, num_alpha=5)
    alphas, betas, loss, density = select_span_plan(influences, configs, density_bound=0.6, sink=1)
    assert all(d <= 0.6 + 1e-9 for d in density.values())
    spans = [moa_spans(alphas, betas, t) for t in (16, 32)]
    assert all(s[0] > s[1] for s in spans)
    for a, b in configs:
        if all(span_density(a, b, t, sink=1) <= 0.6 for t in (16, 32)):
            uniform = sum(float(span_plan_loss(influences[t], [a, a], [b, b], sink=1).sum()) for t in (16, 32))
            assert loss <= uniform + 1e-6
