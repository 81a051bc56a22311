"""CAB's efficient attentions (attnx/ops/efficient): every fast path against its naive reference (forward and
gradients), closed forms (Nystrom with m = L landmarks and ProbSparse with u >= L are softmax attention; ABC with
one-hot slots is softmax attention; LongShort with a window over everything; LARA with one proposal), the causal
forms' CAB causality, the weight modules, and the refused patterns."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import attnx
from attnx.ops.efficient.abc import abc_attention
from attnx.ops.efficient.lara import lara_attention
from attnx.ops.efficient.longshort import longshort_attention
from attnx.ops.efficient.nystrom import _nystrom, iterative_pinv, nystrom_attention
from attnx.ops.efficient.probsparse import probsparse_attention, sample_sizes
from attnx.testing.tolerances import assert_close

B, T, S, N, K, H, V = 2, 13, 10, 4, 2, 8, 5


def inputs(kv_length=T, value_dim=V, seed=0):
    kq, kk, kv = jax.random.split(jax.random.key(seed), 3)
    return (jax.random.normal(kq, (B, T, N, H)), jax.random.normal(kk, (B, kv_length, K, H)),
            jax.random.normal(kv, (B, kv_length, K, value_dim)))


def softmax_attention(q, k, v):
    """Exact softmax attention in float64 numpy (GQA by repeating kv heads): the closed forms' target."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    g = q.shape[2] // k.shape[2]
    logits = np.einsum("btnh,bsnh->bnts", q, np.repeat(k, g, axis=2)) / np.sqrt(q.shape[-1])
    p = np.exp(logits - logits.max(-1, keepdims=True))
    return np.einsum("bnts,bsnv->btnv", p / p.sum(-1, keepdims=True), np.repeat(v, g, axis=2))


def run(fn, *args, **kwargs):
    """fn(*args, **kwargs) under jit (options static): one compile instead of eager dispatch of many small ops."""
    return jax.jit(lambda *a: fn(*a, **kwargs))(*args)


def check_fast_against_reference(fn, fast, cases):
    """Forward and gradients (of q, k, v) of implementation `fast` against "reference", for each (q, k, v, kwargs)
    case; all cases in one jitted computation (one compile: eager dispatch of every small op dominates here)."""
    def both(q, k, v, kwargs):
        results = []
        for impl in (fast, "reference"):  # out and the gradient of sum(sin(out)), sharing one forward pass
            out, pullback = jax.vjp(lambda *a: fn(*a, implementation=impl, **kwargs), q, k, v)
            results.append((out, pullback(jnp.cos(out))))
        return results

    results = jax.jit(lambda arrays: [both(*a, kw) for a, (*_, kw) in zip(arrays, cases)])(
        [c[:3] for c in cases])
    for (got, want), (*_, kwargs) in zip(results, cases):
        what = f"{fn.__name__}({kwargs})"
        assert_close(got[0], want[0], jnp.float32, what=what)
        for name, g, w in zip("qkv", got[1], want[1]):
            assert bool(jnp.all(jnp.isfinite(g))), name
            assert_close(g, w, jnp.float32, "gradient", what=f"{what} d/d{name}")


# ---- Nystromformer ----

def test_nystrom_landmark_path_matches_reference_with_conv_and_uneven_segments():
    conv = jax.random.normal(jax.random.key(3), (N, 3))  # 13 positions in 4 segments: sizes 3, 3, 3, 4
    check_fast_against_reference(nystrom_attention, "linear", [(*inputs(), dict(num_landmarks=4, conv_weight=conv))])


def test_iterative_pinv_converges_to_the_pseudo_inverse():
    a = jax.nn.softmax(2 * jax.random.normal(jax.random.key(1), (3, 6, 6)), axis=-1)
    z30, z6, z3 = jax.jit(lambda a: [iterative_pinv(a, n) for n in (30, 6, 3)])(a)
    np.testing.assert_allclose(z30, np.linalg.pinv(np.asarray(a, np.float64)), atol=1e-3)
    residual = lambda z: float(jnp.max(jnp.abs(z @ a - jnp.eye(6))))
    assert residual(z6) < residual(z3)  # the iteration converges


def test_nystrom_closed_forms_softmax_with_one_landmark_per_position_and_the_conv_shift():
    _, k, v = inputs()
    # Self attention (queries = keys, the Nystrom setting) keeps softmax(Q~ K~^T) well conditioned, so the float32
    # iteration converges (10 steps from the code's start; its default 6 leave ~2e-2 here).
    q = 1.5 * jnp.repeat(k, N // K, axis=2)
    conv = jnp.zeros((N, 3)).at[:, 0].set(1.0)  # tap 0 reads v[t - 1]
    landmarks, exact_branch, with_conv = jax.jit(lambda q, k, v: (
        _nystrom(q * H ** -0.5, k, v, T, 25, "linear"),  # m = T forces the landmark path (pre-scaled queries)
        nystrom_attention(q, k, v, num_landmarks=T),  # the code's T <= m branch
        nystrom_attention(q, k, v, num_landmarks=T, conv_weight=conv)))(q, k, v)
    exact = softmax_attention(q, k, v)
    assert_close(landmarks, exact, jnp.float32)  # up to the pseudo-inverse's accuracy
    assert_close(exact_branch, exact, jnp.float32)
    shifted = np.pad(np.repeat(np.asarray(v), N // K, axis=2), ((0, 0), (1, 0), (0, 0), (0, 0)))[:, :T]
    assert_close(with_conv, exact + shifted, jnp.float32)  # a depthwise 'same' convolution of the values


# ---- ABC ----

def test_abc_causal_scan_matches_reference():
    # CS: the blocked prefix scan (3 blocks of 4 and a partial one) against the dense masked softmax. NS, NC and CC
    # have one code path (the full memory), checked in closed form below.
    cases = [(*inputs(T), dict(causal=True, num_slots=3, block_size=4))]
    check_fast_against_reference(abc_attention, "scan", cases)


def test_abc_with_one_hot_slots_is_softmax_attention():
    q = jax.random.normal(jax.random.key(0), (1, 4, 2, S))
    k = v = jnp.broadcast_to(jnp.eye(S)[None, :, None, :], (1, S, 1, S))  # key s = value s = e_s
    phi = 40.0 * jnp.eye(S)  # slot r's logits pick key r: K~ = K, V~ = V
    got = run(abc_attention, q, k, v, phi_key=phi, phi_value=phi)
    assert_close(got, softmax_attention(q, k, v), jnp.float32)


def test_abc_causal_memory_is_the_prefix_softmax_sum():
    q, k, v = (np.asarray(x, np.float64) for x in inputs(T))
    phi_k, phi_v = np.asarray(jax.random.normal(jax.random.key(5), (H, 3))), np.asarray(
        jax.random.normal(jax.random.key(6), (V, 3)))
    want = np.zeros((B, T, N, V))
    for t in range(T):  # K~_t = sum_{m<=t} softmax_{m<=t}(k_m phi) k_m, per batch and kv head
        def memory(x, phi):
            logits = np.einsum("bmkd,dr->bkrm", x[:, :t + 1], phi)
            w = np.exp(logits - logits.max(-1, keepdims=True))
            return np.einsum("bkrm,bmkd->bkrd", w / w.sum(-1, keepdims=True), x[:, :t + 1])
        km, vm = memory(k, phi_k), memory(v, phi_v)
        logits = np.einsum("bnh,bnrh->bnr", q[:, t] * H ** -0.5, np.repeat(km, N // K, axis=1))
        p = np.exp(logits - logits.max(-1, keepdims=True))
        want[:, t] = np.einsum("bnr,bnrv->bnv", p / p.sum(-1, keepdims=True), np.repeat(vm, N // K, axis=1))
    got = run(abc_attention, *inputs(T), causal=True, phi_key=jnp.asarray(phi_k, jnp.float32),
                        phi_value=jnp.asarray(phi_v, jnp.float32))
    assert_close(got, want, jnp.float32)


def test_abc_rejects_mismatched_weights():
    q, k, v = inputs()
    with pytest.raises(ValueError, match="phi_key"):
        run(abc_attention, q, k, v, phi_key=jnp.zeros((H, 3)), phi_value=jnp.zeros((V, 4)))
    with pytest.raises(ValueError, match="num_slots"):
        run(abc_attention, q, k, v, phi_key=jnp.zeros((H, 3)), phi_value=jnp.zeros((V, 3)), num_slots=4)


# ---- LARA ----

def test_lara_matches_reference():
    # The sampled mode (w = mu + eps); evaluation mode (w = mu) is the same code, checked in closed form below.
    check_fast_against_reference(lara_attention, "linear", [(*inputs(), dict(num_landmarks=4,
                                                                               rng=jax.random.key(7)))])


def test_lara_one_proposal_closed_form_and_randomness_from_rng_only():
    q, k, v = inputs()
    one, base, sampled = jax.jit(lambda *a: (lara_attention(*a, num_landmarks=1), lara_attention(*a, num_landmarks=4),
                                             lara_attention(*a, num_landmarks=4, rng=jax.random.key(1))))(q, k, v)
    # One proposal: importance weight 1, so o_t = softmax_s(f(k_s)) V with w = mu = mean(q) + mean(k) (eval mode).
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    kg = np.repeat(k, N // K, axis=2)
    mu = q.mean(1) + kg.mean(1)  # [B, N, H]
    logits = (np.einsum("bnh,bsnh->bns", mu, kg) - 0.5 * np.sum(kg ** 2, -1).transpose(0, 2, 1)) * H ** -0.5
    p = np.exp(logits - logits.max(-1, keepdims=True))
    want = np.einsum("bns,bsnv->bnv", p / p.sum(-1, keepdims=True), np.repeat(v, N // K, axis=2))
    assert_close(one, np.broadcast_to(want[:, None], one.shape), jnp.float32)
    assert float(jnp.max(jnp.abs(sampled - base))) > 1e-3  # rng draws w = mu + eps; None is the code's w = mu


# ---- LongShort (Transformer-LS) ----

def test_longshort_matches_reference_non_causal_and_causal():
    cases = [(*inputs(value_dim=H), dict(causal=causal, window=window, chunk_size=4, rank=2))
             for causal, window in ((False, 3), (True, 3))]
    check_fast_against_reference(longshort_attention, "blocked", cases)


def test_longshort_window_over_everything_is_one_softmax_over_projected_and_all_keys():
    q, k, v = (np.asarray(x, np.float64) for x in inputs(value_dim=H))
    W = np.asarray(jax.random.normal(jax.random.key(2), (K, H, 3)))

    def ln(x):  # one LayerNorm over all heads' features, identity affine
        x = x - x.mean((-2, -1), keepdims=True)
        return x / np.sqrt((x ** 2).mean((-2, -1), keepdims=True) + 1e-5)

    kw, vw = ln(k), ln(v)
    logits = np.einsum("bskh,khr->bskr", k, W)
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    keys = np.concatenate([ln(np.einsum("bskr,bskh->brkh", p, kw)), kw], 1)
    values = np.concatenate([ln(np.einsum("bskr,bskh->brkh", p, vw)), vw], 1)
    logits = np.einsum("btnh,bsnh->bnts", q * H ** -0.5, np.repeat(keys, N // K, axis=2))
    a = np.exp(logits - logits.max(-1, keepdims=True))
    want = np.einsum("bnts,bsnh->btnh", a / a.sum(-1, keepdims=True), np.repeat(values, N // K, axis=2))
    got = run(longshort_attention, *inputs(value_dim=H), window=T, projection=jnp.asarray(W, jnp.float32))
    assert_close(got, want, jnp.float32)


def test_longshort_causal_form_sees_no_future_and_reaches_past_the_window():
    """Jacobian of the causal output w.r.t. the sequence (q = k = v): zero above the diagonal (no future leaks),
    nonzero below the window once whole chunks have ended (the segment-wise projection carries the far past).
    The prefix form of the CAB test runs over the registry defaults in tests/attnx/test_registry.py."""
    x = jax.random.normal(jax.random.key(0), (1, 7, 2, 4))
    f = lambda x: longshort_attention(x, x, x, causal=True, window=2, chunk_size=3, rank=1)
    reach = np.asarray(jnp.sum(jnp.abs(jax.jit(jax.jacfwd(f))(x)), axis=(0, 2, 3, 4, 6, 7)))  # [t_out, t_in]
    assert np.all(reach[np.triu_indices(7, 1)] == 0)  # nothing from the future
    assert reach[2, 0] == 0  # window [1, 2]; chunk [0, 2] has not ended
    assert reach[5, 3] == 0  # window [4, 5]; chunk [3, 5] has not ended
    assert reach[5, 0] > 0 and reach[6, 3] > 0  # ended chunks carry the far past


def test_longshort_needs_equal_key_and_value_head_sizes():
    with pytest.raises(ValueError, match="value head size"):
        run(longshort_attention, *inputs())


# ---- ProbSparse ----

def test_probsparse_matches_reference():
    check_fast_against_reference(probsparse_attention, "sparse", [(*inputs(), dict(factor=1))])


def test_probsparse_closed_forms_lazy_rows_and_sampling():
    q, k, v = inputs()
    assert sample_sizes(T, T, 5)[1] == T and sample_sizes(T, T, 1)[1] < T
    every, by_key, *by_seed = jax.jit(lambda *a: [probsparse_attention(*a), probsparse_attention(
        *a, factor=1, rng=jax.random.key(0))] + [probsparse_attention(*a, factor=1, seed=s) for s in range(4)])(q, k, v)
    assert_close(every, softmax_attention(q, k, v), jnp.float32)  # u >= T: every query active, exact softmax
    out = by_seed[0]
    lazy = jnp.all(jnp.abs(out - jnp.repeat(v.mean(1, keepdims=True), N // K, axis=2)) < 1e-6, axis=-1)
    assert bool(jnp.all(jnp.sum(~lazy, axis=1) == sample_sizes(T, T, 1)[1]))  # exactly u active rows per head
    assert_close(by_key, out, jnp.float32)  # the default seed 0 is the key rng=jax.random.key(0)
    assert any(float(jnp.max(jnp.abs(other - out))) > 1e-3 for other in by_seed[1:])


# ---- Cached decoding (ABC, LongShort) ----

def test_decode_rules_equal_the_last_rows_of_the_full_causal_call():
    q, k, v = inputs(value_dim=H)
    stale = lambda x: jnp.concatenate([x, jnp.ones((B, 4, K, H))], axis=1)  # slots after the queries: not read
    options = {"abc": dict(num_slots=3, block_size=4), "longshort": dict(window=3, chunk_size=4, rank=2)}

    def both(q, k, v):
        return {name: (attnx.get_attention(name).fn(q, k, v, causal=True, **kw),
                       attnx.get_attention(name).decode(q[:, 8:11], stale(k), stale(v),
                                                        query_positions=jnp.arange(8, 11), **kw))
                for name, kw in options.items()}

    for name, (full, decoded) in jax.jit(both)(q, k, v).items():
        assert_close(decoded, full[:, 8:11], jnp.float32, what=name)


# ---- Refused patterns, registry, weight modules ----

@pytest.mark.parametrize("fn", [nystrom_attention, lara_attention, probsparse_attention])
def test_ns_only_mechanisms_refuse_causal_and_cross_by_name(fn):
    q, k, v = inputs()
    with pytest.raises(ValueError, match="causal=True is not supported"):
        fn(q, k, v, causal=True)
    with pytest.raises(ValueError, match="self attention only"):
        fn(q, *inputs(S)[1:])


def test_registry_entries_declare_cab_patterns():
    want = {"nystrom": {"NS"}, "abc": {"NS", "CS", "NC", "CC"}, "lara": {"NS"}, "longshort": {"NS", "CS"},
            "probsparse": {"NS"}}
    for name, patterns in want.items():
        assert attnx.get_attention(name).patterns == patterns, name


def test_weight_modules_feed_the_attention_layer():
    from models.layers.attention import Attention
    x = jax.random.normal(jax.random.key(0), (1, 7, 16))
    layers = [Attention(16, 2, 1, 8, kind=kind, kind_kwargs=kwargs, rngs=nnx.Rngs(0))
              for kind, kwargs in (("abc", {"num_slots": 3}), ("longshort", {"rank": 1, "window": 2, "chunk_size": 2}))]
    forward = nnx.jit(lambda layers: [layer(x) for layer in layers])
    before = forward(layers)
    weights = [layers[0].router.phi_key, layers[1].router.projection]  # the mixers' own weights reach the output
    for w in weights:
        w[...] = 3.0 * w[...]
    for layer, old, new in zip(layers, before, forward(layers)):
        assert bool(jnp.all(jnp.isfinite(new))) and float(jnp.max(jnp.abs(new - old))) > 1e-4, layer.kind
