"""Diffusion attention control (spec diffusion_multimodal_bench.md §8): structured cross attention (M = M' = 1 or
identical value/key sets give plain attention; fast == reference; the official multi_qkv pairing rule against a
numpy oracle), RCA (zero subject attention outside the foreground), isolation (block-diagonal mask, subjects do not
see each other) and reposition."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnx.ops.builtin import softmax_reference
from attnx.ops.control.isolation import isolation_attention, isolation_mask, isolation_reference, reposition
from attnx.ops.control.region import region_mask_attention, region_mask_reference
from attnx.ops.control.structured import (structured_cross, structured_cross_attention,
                                          structured_cross_attention_reference, structured_cross_reference)
from attnx.testing.tolerances import assert_close

B, T, S, N, K, H = 1, 4, 6, 4, 2, 8  # GQA: 4 query heads over 2 key/value heads


def _qkv(seed=0, T=T, S=S):
    a, b, c, d, e = jax.random.split(jax.random.key(seed), 5)
    q = jax.random.normal(a, (B, T, N, H))
    k = jax.random.normal(b, (B, S, K, H))
    v = jax.random.normal(c, (B, S, K, H))
    extra_k = jax.random.normal(d, (2, B, S, K, H))
    extra_v = jax.random.normal(e, (2, B, S, K, H))
    return q, k, v, extra_k, extra_v


def _np_attention(q, k, v):
    """numpy oracle, independent of attnx: head n reads key head n // (N / K)."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    g = q.shape[-2] // k.shape[-2]
    k, v = np.repeat(k, g, axis=-2), np.repeat(v, g, axis=-2)
    z = np.einsum("btnh,bsnh->bnts", q, k) / np.sqrt(q.shape[-1])
    p = np.exp(z - z.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return np.einsum("bnts,bsnv->btnv", p, v)


# ---- structured cross attention -------------------------------------------------------------------------------
# Each mechanism's checks run inside one jitted bundle (one compile): eager dispatch compiles every primitive
# separately and costs far more on the shared CI cores.

def _structured_loss(fn, mode):
    def loss(q, k, v, ek, ev):
        kw = {"extra_values": ev} if mode == "default" else {"extra_keys": ek}
        return jnp.sum(jnp.sin(fn(q, k, v, mode=mode, **kw)))
    return jax.value_and_grad(loss, argnums=(0, 1, 2, 3, 4))


@jax.jit
def _structured_bundle(q, k, v, ek, ev):
    r = {}
    for mode in ("default", "conjunction"):
        r[f"{mode}_fast"] = _structured_loss(structured_cross, mode)(q, k, v, ek, ev)
        r[f"{mode}_ref_loss"] = _structured_loss(structured_cross_reference, mode)(q, k, v, ek, ev)
        r[f"{mode}_plain"] = structured_cross(q, k, v, mode=mode)
    r["default_ref"] = structured_cross_reference(q, k, v, extra_values=ev)
    r["conjunction_ref"] = structured_cross_reference(q, k, v, mode="conjunction", extra_keys=ek)
    keys, values = jnp.concatenate([k[None], ek]), jnp.concatenate([v[None], ev])
    r["paired_fast"] = structured_cross_attention(q, keys, values)
    r["paired_ref"] = structured_cross_attention_reference(q, keys, values)
    r["same_v"] = structured_cross(q, k, v, extra_values=jnp.stack([v, v, v]))
    r["same_k"] = structured_cross(q, k, v, mode="conjunction", extra_keys=jnp.stack([k, k]))
    r["same_pairs"] = structured_cross_attention(q, jnp.stack([k, k]), jnp.stack([v, v]))
    r["softmax"] = softmax_reference(q, k, v)
    return r


@pytest.fixture(scope="module")
def structured():
    args = _qkv(1)
    return args, _structured_bundle(*args)


@pytest.mark.parametrize("mode", ["default", "conjunction"])
def test_structured_fast_equals_reference_forward_and_gradients(structured, mode):
    _, r = structured
    (lf, gf), (lr, gr) = r[f"{mode}_fast"], r[f"{mode}_ref_loss"]
    assert_close(lf, lr, jnp.float32, what=f"{mode} loss")
    for name, a, b in zip(("q", "k", "v", "extra_k", "extra_v"), gf, gr):
        assert_close(a, b, jnp.float32, kind="gradient", what=f"{mode} d{name}")
    # the mode's unused extras get no gradient; the used ones do
    unused, used = (gf[3], gf[4]) if mode == "default" else (gf[4], gf[3])
    assert float(jnp.max(jnp.abs(unused))) == 0.0 and float(jnp.max(jnp.abs(used))) > 0.0


def test_structured_modes_match_the_official_pairing_rule_numpy(structured):
    (q, k, v, ek, ev), r = structured
    # default: keys [K_p], values [V_p, V_1, V_2] -> (1/3) sum_j A(Q, K_p) V_j (the reference; the fast path is
    # tied to it by the forward/gradient test above)
    want = sum(_np_attention(q, k, x) for x in (v, ev[0], ev[1])) / 3
    assert_close(r["default_ref"], want, jnp.float32, what="default")
    # conjunction: keys [K_p, K_1, K_2], one value set -> (1/3) sum_i A(Q, K_i) V
    want = sum(_np_attention(q, x, v) for x in (k, ek[0], ek[1])) / 3
    assert_close(r["conjunction_ref"], want, jnp.float32, what="conjunction")
    # paired M == M' = 3 -> (1/3) sum_i A(Q, K_i) V_i (not the 9 cross pairs)
    keys, values = np.concatenate([k[None], ek]), np.concatenate([v[None], ev])
    want = sum(_np_attention(q, keys[i], values[i]) for i in range(3)) / 3
    assert_close(r["paired_fast"], want, jnp.float32, what="paired fast")
    assert_close(r["paired_ref"], want, jnp.float32, what="paired reference")


def test_structured_single_sets_and_identical_sets_are_plain_attention(structured):
    (q, k, v, _, _), r = structured
    plain = _np_attention(q, k, v)
    assert_close(r["softmax"], plain, jnp.float32, what="softmax core")
    for mode in ("default", "conjunction"):
        assert_close(r[f"{mode}_plain"], plain, jnp.float32, what=f"M=M'=1 {mode}")
    for name in ("same_v", "same_k", "same_pairs"):
        assert_close(r[name], plain, jnp.float32, what=name)


def test_structured_errors():
    q, k, v, ek, ev = _qkv(0)
    with pytest.raises(ValueError, match="causal"):
        structured_cross(q, k, v, causal=True)
    with pytest.raises(ValueError, match="equals key length"):
        structured_cross(q, q[..., :K, :], q[..., :K, :])
    with pytest.raises(ValueError, match="mode"):
        structured_cross(q, k, v, mode="and")
    with pytest.raises(ValueError, match="extra_keys"):
        structured_cross(q, k, v, extra_keys=ek)
    with pytest.raises(ValueError, match="extra_values"):
        structured_cross(q, k, v, mode="conjunction", extra_values=ev)
    with pytest.raises(ValueError, match="M=3 key sets and M'=2"):
        structured_cross_attention(q, jnp.stack([k, k, k]), jnp.stack([v, v]))
    with pytest.raises(ValueError, match="stacked sets"):
        structured_cross_attention(q, k, v[None])


# ---- region-constrained cross attention (RCA) -----------------------------------------------------------------

FOREGROUND = jnp.array([[True, False, True, False]])           # [B, T]: query pixels 0 and 2 inside
SUBJECT = jnp.array([[False, True, True, False, False, False]])  # [B, S]: tokens 1, 2 are the subject's words
OUTSIDE = ~np.asarray(FOREGROUND[0])
SUBJECT_KEYS = np.asarray(SUBJECT[0])


@jax.jit
def _region_bundle(q, k, v):
    def run(fn, q, k, v, **kw):
        return fn(q, k, v, foreground=FOREGROUND, subject_tokens=SUBJECT, **kw)

    def loss(fn):
        return jax.value_and_grad(lambda q, k, v: jnp.sum(jnp.sin(run(fn, q, k, v))), argnums=(0, 1, 2))(q, k, v)

    r = {"fast": loss(region_mask_attention), "ref": loss(region_mask_reference)}
    r["out"] = run(region_mask_attention, q, k, v)
    # values that are 0 except on the subject's words
    r["only_subject"] = run(region_mask_attention, q, k, v * SUBJECT[..., None, None])
    # reference gradients (the fast path's equal them): outside pixels w.r.t. k, v; inside pixels w.r.t. v
    r["grad_outside"] = jax.grad(lambda k, v: jnp.sum(run(region_mask_reference, q, k, v)[:, OUTSIDE]),
                                 argnums=(0, 1))(k, v)
    r["grad_inside"] = jax.grad(lambda v: jnp.sum(run(region_mask_reference, q, k, v)[:, ~OUTSIDE]))(v)
    r["nonsubject"] = softmax_reference(q, k[:, ~SUBJECT_KEYS], v[:, ~SUBJECT_KEYS])
    r["no_mask"], r["softmax"] = region_mask_attention(q, k, v), softmax_reference(q, k, v)
    r["all_subject"] = region_mask_reference(q, k, v, foreground=FOREGROUND, subject_tokens=jnp.ones((B, S), bool))
    return r


@pytest.fixture(scope="module")
def region():
    return _region_bundle(*_qkv(4)[:3])


def test_region_fast_equals_reference_forward_and_gradients(region):
    (lf, gf), (lr, gr) = region["fast"], region["ref"]
    assert_close(lf, lr, jnp.float32)
    for a, b in zip(gf, gr):
        assert_close(a, b, jnp.float32, kind="gradient")


def test_region_zero_subject_attention_outside_the_mask(region):
    out = region["only_subject"]
    assert float(jnp.max(jnp.abs(out[:, OUTSIDE]))) == 0.0
    assert float(jnp.min(jnp.max(jnp.abs(out[:, ~OUTSIDE]), axis=(-1, -2)))) > 0.0
    gk, gv = region["grad_outside"]
    assert float(jnp.max(jnp.abs(gk[:, SUBJECT_KEYS]))) == 0.0
    assert float(jnp.max(jnp.abs(gv[:, SUBJECT_KEYS]))) == 0.0
    assert float(jnp.max(jnp.abs(region["grad_inside"][:, SUBJECT_KEYS]))) > 0.0
    # outside pixels = plain attention over the non-subject words; no mask = plain attention
    assert_close(region["out"][:, OUTSIDE], region["nonsubject"][:, OUTSIDE], jnp.float32)
    assert_close(region["no_mask"], region["softmax"], jnp.float32)
    # a pixel with no allowed key (every word a subject word, pixel outside) reads 0, not NaN
    assert float(jnp.max(jnp.abs(region["all_subject"][:, OUTSIDE]))) == 0.0


def test_region_errors():
    q, k, v, _, _ = _qkv(0)
    with pytest.raises(ValueError, match="causal"):
        region_mask_attention(q, k, v, causal=True)
    with pytest.raises(ValueError, match="equals key length"):
        region_mask_attention(q, q[..., :K, :], q[..., :K, :])
    with pytest.raises(ValueError, match="give both"):
        region_mask_attention(q, k, v, foreground=FOREGROUND)
    with pytest.raises(ValueError, match="bool"):
        region_mask_attention(q, k, v, foreground=FOREGROUND.astype(jnp.int32), subject_tokens=SUBJECT)
    with pytest.raises(ValueError, match="must end in"):
        region_mask_attention(q, k, v, foreground=SUBJECT, subject_tokens=FOREGROUND)


# ---- isolation and reposition ---------------------------------------------------------------------------------

Q_IDS = jnp.array([[1, 0, 2, 1]])            # target tokens
K_IDS = jnp.array([[2, 1, 0, 1, 0, 2]])      # [reference; target] tokens
ROWS_1 = np.asarray(Q_IDS[0] == 1)
KEYS_2 = np.asarray(K_IDS[0] == 2)
KEYS_1_OR_BG = np.asarray((K_IDS[0] == 1) | (K_IDS[0] == 0))


def test_isolation_mask_is_block_diagonal_over_subject_ids():
    ids = np.array([2, 0, 1, 2, 1, 0, 1])
    order = np.argsort(ids, kind="stable")
    masks = jax.jit(lambda a: (isolation_mask(a, a, subjects_see_background=False, background_sees_all=False),
                               isolation_mask(a, a)))
    strict, default = (np.asarray(m) for m in masks(jnp.asarray(ids[order])))
    blocks = np.zeros((len(ids), len(ids)), bool)
    start = 0
    for n in np.bincount(ids):
        blocks[start:start + n, start:start + n] = True
        start += n
    np.testing.assert_array_equal(strict, blocks)
    # defaults: subject rows add the background columns; background rows see every key
    s = ids[order]
    np.testing.assert_array_equal(default, (s[:, None] == s[None, :]) | (s[None, :] == 0) | (s[:, None] == 0))


@jax.jit
def _isolation_bundle(q, k, v):
    def run(fn, k, v):
        return fn(q, k, v, q_ids=Q_IDS, k_ids=K_IDS)

    def loss(fn):
        return jax.value_and_grad(lambda q, k, v: jnp.sum(jnp.sin(fn(q, k, v, q_ids=Q_IDS, k_ids=K_IDS))),
                                  argnums=(0, 1, 2))(q, k, v)

    r = {"fast": loss(isolation_attention), "ref": loss(isolation_reference), "out": run(isolation_attention, k, v)}
    r["grad_rows_1"] = jax.grad(lambda k, v: jnp.sum(run(isolation_reference, k, v)[:, ROWS_1]), argnums=(0, 1))(k, v)
    r["subject_1_plain"] = softmax_reference(q, k[:, KEYS_1_OR_BG], v[:, KEYS_1_OR_BG])
    x = q[..., :K, :]  # self attention (T == S) without ids: plain attention
    r["self_no_ids"], r["self_softmax"] = isolation_attention(q, x, x), softmax_reference(q, x, x)
    return r


def test_isolation_fast_equals_reference_and_subjects_do_not_mix():
    r = _isolation_bundle(*_qkv(6)[:3])
    (lf, gf), (lr, gr) = r["fast"], r["ref"]
    assert_close(lf, lr, jnp.float32)
    for a, b in zip(gf, gr):
        assert_close(a, b, jnp.float32, kind="gradient")
    # subject-1 queries never read subject-2 keys/values (reference gradients: the fast path's equal them)
    gk, gv = r["grad_rows_1"]
    assert float(jnp.max(jnp.abs(gk[:, KEYS_2]))) == 0.0 and float(jnp.max(jnp.abs(gv[:, KEYS_2]))) == 0.0
    # a subject-1 row equals plain attention over the subject-1 and background keys
    assert_close(r["out"][:, ROWS_1], r["subject_1_plain"][:, ROWS_1], jnp.float32)
    assert_close(r["self_no_ids"], r["self_softmax"], jnp.float32)


def test_isolation_errors():
    q, k, v, _, _ = _qkv(0)
    with pytest.raises(ValueError, match="causal"):
        isolation_attention(q, k, v, causal=True)
    with pytest.raises(ValueError, match="give both"):
        isolation_attention(q, k, v, q_ids=Q_IDS)
    with pytest.raises(ValueError, match="integer"):
        isolation_attention(q, k, v, q_ids=Q_IDS.astype(jnp.float32), k_ids=K_IDS)
    with pytest.raises(ValueError, match="must end in"):
        isolation_attention(q, k, v, q_ids=K_IDS, k_ids=Q_IDS)


def test_reposition_moves_and_scales_the_box():
    feat = jax.random.normal(jax.random.key(7), (1, 6, 6, 3))
    moved, grown = jax.jit(lambda f: (reposition(f, (0, 0, 2, 3), (3, 2, 5, 5)),
                                      reposition(f, (1, 1, 2, 2), (2, 2, 4, 5))))(feat)
    np.testing.assert_array_equal(np.asarray(moved[:, 3:5, 2:5]), np.asarray(feat[:, 0:2, 0:3]))
    untouched = np.ones((6, 6), bool)
    untouched[3:5, 2:5] = False
    np.testing.assert_array_equal(np.asarray(moved[0])[untouched], np.asarray(feat[0])[untouched])
    # a constant 1x1 crop scaled to 2x3 stays constant
    np.testing.assert_allclose(np.asarray(grown[0, 2:4, 2:5]), np.broadcast_to(feat[0, 1, 1], (2, 3, 3)), rtol=1e-6)
    with pytest.raises(ValueError, match="box_dst"):
        reposition(feat, (0, 0, 2, 2), (5, 5, 7, 7))
    with pytest.raises(ValueError, match="box_src"):
        reposition(feat, (0, 0, 2.0, 2), (0, 0, 2, 2))


# ---- the shared cross-attention-only refusal --------------------------------------------------------------------

@pytest.mark.parametrize("name", ["structured_cross", "region_mask", "conditional_cross"])
def test_cross_only_entries_refuse_causal_and_self_attention_alike(name):
    """structured_cross, region_mask and conditional_cross share attnx.validation.refuse_self_and_causal: the same
    two refusals, each naming the entry (the registry function and its reference)."""
    import attnx
    spec = attnx.get_attention(name)
    q, k, v, _, _ = _qkv(0)
    for fn in (spec.fn, spec.reference):
        with pytest.raises(ValueError, match=rf"^{name}: causal=True is not supported: .*pattern NC"):
            fn(q, k, v, causal=True)
        with pytest.raises(ValueError, match=rf"^{name}: query length T={T} equals key length S={T}: .*cross "
                                             r"attention only.*for self attention use 'softmax'"):
            fn(q, q[..., :K, :], q[..., :K, :])
