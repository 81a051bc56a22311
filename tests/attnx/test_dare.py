"""DARE (spec llm_mechanisms.md §12 (e)): tied tables reproduce TWIN, the logits carry no gradient to E_rep, the
code's split semantic/time score and top-k search, and the multi-head `dare` entry (split score, causal top-k,
kv_source) against a direct formula with gradients and the cached decode."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import attnx
from attnx.ops.decoupled.dare import (MASK_FILL, dare_attention, dare_decode, dare_features,
                                      decoupled_target_attention, embed, target_scores)
from attnx.testing.tolerances import assert_close

B, S, ITEMS, CATS, TIMES = 3, 10, 20, 6, 12
DIMS = (8, 4, 4)  # item, category, time (time last, as the code concatenates)
TIME_DIM, TOP_K = DIMS[-1], 4


def tables(seed):
    keys = jax.random.split(jax.random.key(seed), 3)
    return [jax.random.normal(k, (n, d)) for k, n, d in zip(keys, (ITEMS, CATS, TIMES), DIMS)]


def ids(seed=7):
    keys = jax.random.split(jax.random.key(seed), 6)
    target = [jax.random.randint(k, (B,), 0, n) for k, n in zip(keys[:3], (ITEMS, CATS, TIMES))]
    history = [jax.random.randint(k, (B, S), 0, n) for k, n in zip(keys[3:], (ITEMS, CATS, TIMES))]
    mask = jnp.arange(S)[None, :] >= jnp.array([[0], [3], [8]])  # left padding, one row with only 2 behaviours
    return target, history, mask


def dare_model(att_tables, rep_tables, target, history, mask):
    u = decoupled_target_attention(embed(att_tables, target), embed(att_tables, history),
                                   embed(rep_tables, history), mask=mask, time_dim=TIME_DIM, top_k=TOP_K)
    return dare_features(embed(rep_tables, target), u)


def twin_by_hand(table, target, history, mask):
    """TWIN with one set of tables, written from model/attention_pytorch.py and din_pytorch.py in numpy."""
    t = np.asarray(embed(table, target), np.float64)
    h = np.asarray(embed(table, history), np.float64)
    sem, tim = t.shape[-1] - TIME_DIM, TIME_DIM
    scores = (np.einsum("bd,bsd->bs", t[:, :sem], h[:, :, :sem]) / np.sqrt(sem)
              + np.einsum("bd,bsd->bs", t[:, sem:], h[:, :, sem:]) / np.sqrt(tim))
    filled = np.where(np.asarray(mask), scores, MASK_FILL)
    out = []
    for b in range(B):
        keep = np.argsort(-filled[b], kind="stable")[:TOP_K]  # torch.topk; padded rows may enter (code quirk)
        p = np.exp(scores[b, keep] - scores[b, keep].max())
        out.append((p / p.sum()) @ h[b, keep])
    u = np.stack(out)
    return np.concatenate([t, u, t * u], -1)


def test_tied_tables_reproduce_twin_and_decoupled_ones_differ():
    target, history, mask = ids()
    table, other = tables(0), tables(1)
    run = jax.jit(dare_model)
    tied = run(table, table, target, history, mask)
    np.testing.assert_allclose(np.asarray(tied), twin_by_hand(table, target, history, mask), rtol=2e-5, atol=2e-5)
    assert float(jnp.max(jnp.abs(run(table, other, target, history, mask) - tied))) > 0.1


def test_logits_carry_no_gradient_to_the_representation_tables():
    target, history, mask = ids()
    att, rep = tables(0), tables(1)

    def logits(att, rep):
        _, scores = decoupled_target_attention(embed(att, target), embed(att, history), embed(rep, history),
                                               mask=mask, time_dim=TIME_DIM, return_scores=True)
        return jnp.sum(jnp.sin(scores))

    to_att, to_rep = jax.jit(jax.grad(logits, argnums=(0, 1)))(att, rep)
    for g in to_rep:
        np.testing.assert_array_equal(np.asarray(g), 0.0)
    assert sum(float(jnp.sum(jnp.abs(g))) for g in to_att) > 0
    # the features do reach both sets of tables
    feats = jax.jit(jax.grad(lambda a, r: jnp.sum(jnp.sin(dare_model(a, r, target, history, mask))), (0, 1)))
    assert all(float(jnp.sum(jnp.abs(g))) > 0 for grads in feats(att, rep) for g in grads)


def test_split_score_scales_each_part_by_its_own_width():
    q, k = jax.random.normal(jax.random.key(2), (2, 6)), jax.random.normal(jax.random.key(3), (2, 5, 6))
    got = target_scores(q, k, time_dim=2)
    want = (jnp.einsum("bd,bsd->bs", q[:, :4], k[:, :, :4]) / 2.0
            + jnp.einsum("bd,bsd->bs", q[:, 4:], k[:, :, 4:]) / 2**0.5)
    assert_close(got, want, jnp.float32)


# ---- multi-head entry ----

Bm, T, Sx, N, K, H = 2, 6, 8, 4, 2, 8


def qkv(s=T, seed=4):
    keys = jax.random.split(jax.random.key(seed), 4)
    return [jax.random.normal(k, (Bm, n_, hd_, H)) for k, (n_, hd_) in zip(keys, ((T, N), (s, K), (s, K), (s, K)))]


def direct(q, k, v, causal, time_dim, top_k):
    """softmax over each query's top_k allowed keys of the split score; GQA by repeating key/value heads."""
    k, v = jnp.repeat(k, N // K, 2), jnp.repeat(v, N // K, 2)
    split = H - time_dim
    logits = (jnp.einsum("btnh,bsnh->bnts", q[..., :split], k[..., :split]) / split**0.5
              + jnp.einsum("btnh,bsnh->bnts", q[..., split:], k[..., split:]) / time_dim**0.5)
    allowed = jnp.tril(jnp.ones(logits.shape[-2:], bool)) if causal else jnp.ones(logits.shape[-2:], bool)
    logits = jnp.where(allowed, logits, -jnp.inf)
    kth = jnp.sort(logits, -1)[..., -top_k][..., None]
    logits = jnp.where(logits >= kth, logits, -jnp.inf)
    return jnp.einsum("bnts,bsnh->btnh", jax.nn.softmax(logits, -1), v)


def test_entry_matches_the_direct_formula_with_gradients():
    q, k, v, _ = qkv()
    options = dict(time_dim=2, top_k=3)

    @jax.jit
    def run(q, k, v):
        loss = lambda f: lambda q, k, v: jnp.sum(jnp.sin(f(q, k, v)))
        fast = lambda q, k, v: dare_attention(q, k, v, causal=True, **options)
        want = lambda q, k, v: direct(q, k, v, True, 2, 3)
        return ([f(q, k, v) for f in (fast, want)], [jax.grad(loss(f), (0, 1, 2))(q, k, v) for f in (fast, want)],
                dare_attention(q, k, v, causal=False, **options), direct(q, k, v, False, 2, 3))

    (got, want), (grads, want_grads), nc, nc_want = run(q, k, v)
    assert_close(got, want, jnp.float32)
    assert_close(nc, nc_want, jnp.float32)
    for g, w in zip(grads, want_grads):
        assert_close(g, w, jnp.float32, kind="gradient")


def test_kv_source_takes_logits_and_values_from_separate_streams_and_decode_matches():
    q, k, v, other = qkv()
    spec = attnx.get_attention("dare")

    @jax.jit
    def run(q, k, v, other):
        cache_k = jnp.zeros((Bm, T + 2, K, H)).at[:, :T].set(k)
        cache_v = jnp.zeros((Bm, T + 2, K, H)).at[:, :T].set(other)
        return (spec.fn(q, k, v, causal=True, kv_source=(None, other), top_k=2),
                spec.fn(q, k, other, causal=True, top_k=2),
                dare_decode(q[:, T - 2:], cache_k, cache_v, query_positions=jnp.arange(T - 2, T), top_k=2))

    via_source, direct_args, rows = run(q, k, v, other)
    assert_close(via_source, direct_args, jnp.float32)
    assert_close(rows, via_source[:, T - 2:], jnp.float32)


def test_bad_arguments_are_named():
    q, k, v, _ = qkv()
    with pytest.raises(ValueError, match=r"dare.time_dim: expected an int in \[0, 8\)"):
        dare_attention(q, k, v, time_dim=8)
    with pytest.raises(ValueError, match="dare.top_k"):
        dare_attention(q, k, v, top_k=0)
    with pytest.raises(ValueError, match="dare.kv_source"):
        dare_attention(q, k, v, kv_source=(k,))
    with pytest.raises(ValueError, match="dare.top_k"):
        decoupled_target_attention(q[:, 0, 0], k[:, :, 0], v[:, :, 0], top_k=T + 1)
