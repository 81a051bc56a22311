"""Transformer-LS projection logits from the layer input (`projection_scores`, the official code's dconv_fc /
dconv_1) and CausalLS's Transformer-XL relative positions, and LARA's antithetic sampling, optimal-approximation
ratio and adaptive segment means: fast paths against their references (forward and gradients), both against
independent float64 numpy ports of the code's formulas, and the weight module (input-side projection, relative
position weights) in the attention layer."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from attnx.ops.efficient.lara import lara_attention
from attnx.ops.efficient.longshort import longshort_attention
from attnx.testing.tolerances import assert_close

B, T, N, K, H = 1, 13, 4, 2, 8


def inputs(value_dim=H, seed=0):
    kq, kk, kv = jax.random.split(jax.random.key(seed), 3)
    return (jax.random.normal(kq, (B, T, N, H)), jax.random.normal(kk, (B, T, K, H)),
            jax.random.normal(kv, (B, T, K, value_dim)))


def fast_and_reference(fn, fast, cases):
    """For each (arrays, kwargs) case: (out, gradients of sum(sin(out)) w.r.t. the arrays) for `fast` and
    "reference", all in one jitted computation. arrays = (q, k, v, *extra), extra passed as kwargs named in
    kwargs["_extra"]."""
    def one(arrays, kwargs):
        kwargs = dict(kwargs)
        names = kwargs.pop("_extra", ())
        results = []
        for impl in (fast, "reference"):
            def f(q, k, v, *extra):
                return fn(q, k, v, implementation=impl, **kwargs, **dict(zip(names, extra)))
            out, pullback = jax.vjp(f, *arrays)
            results.append((out, pullback(jnp.cos(out))))
        return results

    return jax.jit(lambda arrays: [one(a, kw) for a, (_, kw) in zip(arrays, cases)])([a for a, _ in cases])


# ---- LongShort: projection logits from the layer input, CausalLS's relative positions ----

def causal_ls_numpy(q, k, v, scores, rel, *, window, chunk_size):
    """float64 loop over queries and heads of CausalLS's `attn` with its relative terms (identity DualLN, projection
    logits `scores` [B, T, K, r] from the layer input, zero-memory slots masked): window scores
    (q + u) . k_s + (q + v_r) . R_w(t - s); chunk scores q . k_bar + q . R_c((a - c) r - 1 - rho) for the chunks c
    ended before the query's chunk a."""
    q, k, v, scores = (np.asarray(x, np.float64) for x in (q, k, v, scores))
    window_net, chunk_net, chunk_bias, u, v_r = (np.asarray(x, np.float64) for x in rel)
    b_, t_, n_, h_ = q.shape
    g, r, P = n_ // k.shape[2], scores.shape[-1], window_net.shape[0]
    inv_freq = 1.0 / 10000.0 ** (np.arange(0, P, 2) / P)
    pe = lambda d: np.concatenate([np.sin(d * inv_freq), np.cos(d * inv_freq)])

    def ln(x):
        x = x - x.mean((-2, -1), keepdims=True)
        return x / np.sqrt((x ** 2).mean((-2, -1), keepdims=True) + 1e-5)

    kw, vw = ln(k), ln(v)
    out = np.zeros(q.shape[:3] + (v.shape[-1],))
    for b in range(b_):
        k_bar, v_bar = {}, {}
        for c in range(t_ // chunk_size):
            sl = slice(c * chunk_size, (c + 1) * chunk_size)
            logits = scores[b, sl]
            p = np.exp(logits - logits.max(0)) / np.exp(logits - logits.max(0)).sum(0)
            k_bar[c], v_bar[c] = ln(np.einsum("skr,skh->rkh", p, k[b, sl])), ln(np.einsum("skr,skh->rkh", p, v[b, sl]))
        for t in range(t_):
            a = t // chunk_size
            for n in range(n_):
                kv, qt = n // g, q[b, t, n] / np.sqrt(h_)
                scores, values = [], []
                for c in range(a):
                    for rho in range(r):
                        rc = pe((a - c) * r - 1 - rho) @ chunk_net[:, n] + chunk_bias[n]
                        scores.append(qt @ k_bar[c][rho, kv] + qt @ rc)
                        values.append(v_bar[c][rho, kv])
                for s in range(max(0, t - window + 1), t + 1):
                    scores.append((qt + u[n]) @ kw[b, s, kv] + (qt + v_r[n]) @ (pe(t - s) @ window_net[:, n]))
                    values.append(vw[b, s, kv])
                p = np.exp(np.array(scores) - max(scores))
                out[b, t, n] = (p / p.sum()) @ np.array(values)
    return out


def test_longshort_input_scores_and_relative_positions_match_the_numpy_port_and_the_reference():
    q, k, v = inputs(seed=1)
    scores = 0.5 * jax.random.normal(jax.random.key(6), (B, T, K, 2))  # arbitrary logits, not a function of k
    rk = jax.random.split(jax.random.key(9), 5)
    P = 6
    rel = (0.5 * jax.random.normal(rk[0], (P, N, H)), 0.5 * jax.random.normal(rk[1], (P, N, H)),
           0.3 * jax.random.normal(rk[2], (N, H)), 0.3 * jax.random.normal(rk[3], (N, H)),
           0.3 * jax.random.normal(rk[4], (N, H)))
    kwargs = dict(causal=True, window=3, chunk_size=4, rank=2, relative_positions=rel, _extra=("projection_scores",))
    (fast, fast_grads), (ref, ref_grads) = fast_and_reference(longshort_attention, "blocked",
                                                              [((q, k, v, scores), kwargs)])[0]
    want = causal_ls_numpy(q, k, v, scores, rel, window=3, chunk_size=4)
    assert_close(fast, want, jnp.float32, what="blocked")
    assert_close(ref, want, jnp.float32, what="reference")
    for name, g, w in zip(("q", "k", "v", "scores"), fast_grads, ref_grads):  # gradients reach the logits too
        assert bool(jnp.all(jnp.isfinite(g))), name
        assert_close(g, w, jnp.float32, "gradient", what=f"d/d{name}")

    # Non-causal: the logits enter exactly where K W_P did (both branches take them from the entry), so passing
    # K W_P as scores reproduces the key form (whose gradients tests/attnx/test_efficient.py checks).
    W = jax.random.normal(jax.random.key(5), (K, H, 2))
    key_logits = jnp.einsum("bskh,khr->bskr", k, W)
    by_key, by_scores = jax.jit(lambda q, k, v: (
        longshort_attention(q, k, v, projection=W, window=3),
        longshort_attention(q, k, v, projection_scores=key_logits, projection_from="input", window=3)))(q, k, v)
    assert_close(by_scores, by_key, jnp.float32, what="non-causal")
    with pytest.raises(ValueError, match="only the causal form"):
        longshort_attention(q, k, v, relative_positions=rel)
    with pytest.raises(ValueError, match="relative_positions: expected nets"):
        longshort_attention(q, k, v, causal=True, relative_positions=(rel[0][:5],) + rel[1:])


def test_longshort_input_scores_are_validated():
    q, k, v = inputs()
    scores = jnp.zeros((B, T, K, 2))
    with pytest.raises(ValueError, match="not both"):
        longshort_attention(q, k, v, projection_scores=scores, projection=jnp.zeros((K, H, 2)))
    with pytest.raises(ValueError, match=r"projection_scores: expected \[\*B, S, K, r\]"):
        longshort_attention(q, k, v, projection_scores=scores[:, :3])  # a decode step's rows only
    with pytest.raises(ValueError, match="projection_from='input' but projection_scores was not given"):
        longshort_attention(q, k, v, projection_from="input")
    with pytest.raises(ValueError, match="projection_from"):
        longshort_attention(q, k, v, projection_from="x")


def test_longshort_layer_owns_input_projection_and_relative_positions():
    from models.layers.attention import Attention
    from models.layers.mixers.longshort import LongShortProjection

    x = jax.random.normal(jax.random.key(0), (1, 7, 16))
    kwargs = {"rank": 1, "window": 2, "chunk_size": 2, "relative_positions": True}
    layer = Attention(16, 2, 1, 8, kind="longshort", kind_kwargs=kwargs, rngs=nnx.Rngs(0))
    router = layer.router
    assert isinstance(router, LongShortProjection) and router.projection_from == "input"
    assert router.projection[...].shape == (16, 1, 1) and router.window_net[...].shape == (16, 2, 8)
    extra = router(x, None)
    want = np.einsum("btd,dkr->btkr", np.asarray(x), np.asarray(router.projection[...])) + np.asarray(
        router.projection_bias[...])
    assert_close(extra["projection_scores"], want, jnp.float32)
    assert len(extra["relative_positions"]) == 5

    forward = nnx.jit(lambda layer: layer(x))
    before = forward(layer)
    outputs = []
    for weight in (router.projection, router.window_net):  # the input-side W_P and r_net reach the output
        weight[...] = 3.0 * weight[...]
        outputs.append(forward(layer))
        weight[...] = weight[...] / 3.0
    for after in outputs:
        assert bool(jnp.all(jnp.isfinite(after))) and float(jnp.max(jnp.abs(after - before))) > 1e-4
    # (a decode step's scores cover only the new tokens: refused, see test_longshort_input_scores_are_validated)
    with pytest.raises(ValueError, match="projection_from"):
        LongShortProjection(16, 2, num_kv_heads=1, head_dim=8, projection_from="values", rngs=nnx.Rngs(0))


# ---- LARA: antithetic sampling, optimal-approximation ratio, adaptive segment means ----

def lara_numpy(q, k, v, *, num_landmarks, noise=None, antithetic=False, optimal_approximation=False,
               segment_projections=None):
    """float64 port of CAB's LinearRA (per query head; kv heads repeated). noise [B, C, N, H] or None (w = mu)."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    g = q.shape[2] // k.shape[2]
    k, v = np.repeat(k, g, axis=2), np.repeat(v, g, axis=2)
    n, d = q.shape[1], q.shape[-1]
    c = min(num_landmarks, n)
    segs = n // c
    n_short = (segs + 1) * c - n if n % c else c  # the code's split: first n_short segments of segs positions
    bounds = np.cumsum([0] + [segs] * n_short + [segs + 1] * (c - n_short))
    seg_mean = lambda x: np.stack([x[:, a:b].mean(1) for a, b in zip(bounds[:-1], bounds[1:])], 1)  # [B, C, N, H]
    q_bar, k_bar = seg_mean(q), seg_mean(k)
    if segment_projections is not None:
        qw, qb, kw, kb = (np.asarray(x, np.float64) for x in segment_projections)
        q_bar, k_bar = q_bar @ qw + qb, k_bar @ kw + kb
    mu = q_bar + k_bar
    if noise is None:
        w = mu
    elif antithetic:
        noise = np.asarray(noise, np.float64)
        mu, w = np.concatenate([mu, mu], 1), np.concatenate([mu + noise, mu - noise], 1)
    else:
        w = mu + np.asarray(noise, np.float64)
    s = d ** -0.5

    def feats(x):  # [B, N, C, L]
        return np.einsum("bcnh,blnh->bncl", w, s * x) - s * np.einsum("blnh->bnl", x ** 2)[:, :, None] / 2

    log_q, log_k = feats(q), feats(k)
    log_mu = np.einsum("bcnh,bcnh->bnc", w, s * mu) - s * np.einsum("bcnh->bnc", mu ** 2) / 2
    stratum = np.einsum("bcnh,btnh->bnct", s * mu, q)
    if optimal_approximation:
        stratum = stratum + np.log(np.linalg.norm(v, axis=-1) + 1e-10).transpose(0, 2, 1)[:, :, None]
    lse = lambda x, axis: np.log(np.exp(x - x.max(axis, keepdims=True)).sum(axis, keepdims=True)) + x.max(
        axis, keepdims=True)
    softmax = lambda x, axis: np.exp(x - lse(x, axis))
    ratio = stratum + log_q + lse(log_k, -1) - log_mu[..., None]
    kv = np.einsum("bncs,bsnv->bncv", softmax(log_k, -1), v)
    return np.einsum("bnct,bncv->btnv", softmax(ratio, 2), kv)


def test_lara_variants_match_the_numpy_port_and_their_fast_paths_the_reference():
    q, k, v = inputs(value_dim=5)
    C = 4  # 13 positions: segments of 3, 3, 3, 4 (the code's uneven split)
    rng = jax.random.key(7)
    noise = jax.random.normal(rng, (B, C, K, N // K, H)).reshape(B, C, N, H)  # what lara_attention draws from rng
    pk = jax.random.split(jax.random.key(8), 4)
    projections = (jnp.eye(H) + 0.3 * jax.random.normal(pk[0], (H, H)), 0.1 * jax.random.normal(pk[1], (H,)),
                   jnp.eye(H) + 0.3 * jax.random.normal(pk[2], (H, H)), 0.1 * jax.random.normal(pk[3], (H,)))
    # The adaptive weights travel as an extra differentiated argument, so their gradients are compared too.
    cases = [((q, k, v), dict(num_landmarks=C, rng=rng, antithetic=True, training=True)),
             ((q, k, v, projections), dict(num_landmarks=C, optimal_approximation=True,
                                           proposal_gen="adaptive-seg-means", _extra=("segment_projections",)))]
    results = fast_and_reference(lara_attention, "linear", cases)
    for (got, want), (arrays, kwargs) in zip(results, cases):
        port = {key: value for key, value in kwargs.items() if key in ("num_landmarks", "antithetic",
                                                                         "optimal_approximation")}
        if len(arrays) == 4:
            port["segment_projections"] = arrays[3]
        expected = lara_numpy(q, k, v, noise=noise if "rng" in kwargs else None, **port)
        what = f"lara({sorted(port)}, rng={'rng' in kwargs})"
        assert_close(got[0], expected, jnp.float32, what=what)
        assert_close(want[0], expected, jnp.float32, what=what + " reference")
        names = ["q", "k", "v"] + [f"segment_projections[{i}]" for i in range(4)] * (len(arrays) == 4)
        for name, g, w in zip(names, jax.tree.leaves(got[1]), jax.tree.leaves(want[1])):
            assert bool(jnp.all(jnp.isfinite(g))) and float(jnp.max(jnp.abs(g))) > 0, name
            assert_close(g, w, jnp.float32, "gradient", what=f"{what} d/d{name}")
    # Antithetic pairs differ from one-sided sampling with the same draw (2C proposals, not C); the port stands in
    # for a second compile of the function, which matched it above.
    one_sided = lara_numpy(q, k, v, num_landmarks=C, noise=noise)
    assert float(np.max(np.abs(np.asarray(results[0][0][0]) - one_sided))) > 1e-4


def test_lara_variant_options_are_validated():
    q, k, v = inputs()
    with pytest.raises(ValueError, match="lara.antithetic"):
        lara_attention(q, k, v, antithetic=1)
    adaptive = dict(proposal_gen="adaptive-seg-means")
    with pytest.raises(ValueError, match="lara.segment_projections"):
        lara_attention(q, k, v, segment_projections=(jnp.eye(H), jnp.zeros(H), jnp.eye(H)), **adaptive)
    with pytest.raises(ValueError, match="lara.segment_projections"):
        lara_attention(q, k, v, segment_projections=(jnp.eye(4), jnp.zeros(4), jnp.eye(4), jnp.zeros(4)), **adaptive)
    with pytest.raises(ValueError, match="needs the weights"):
        lara_attention(q, k, v, **adaptive)
    with pytest.raises(ValueError, match="proposal_gen='seg-means' uses the plain segment means"):
        lara_attention(q, k, v, segment_projections=(jnp.eye(H), jnp.zeros(H), jnp.eye(H), jnp.zeros(H)))
    with pytest.raises(ValueError, match="lara.proposal_gen"):
        lara_attention(q, k, v, proposal_gen="pool")
    with pytest.raises(ValueError, match="needs a PRNG key"):
        lara_attention(q, k, v, training=True)
    with pytest.raises(ValueError, match="draws nothing"):
        lara_attention(q, k, v, training=False, rng=jax.random.key(0))
    with pytest.raises(ValueError, match="lara.training"):
        lara_attention(q, k, v, training=1)
