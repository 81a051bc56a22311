"""Multimodal masks and head transforms (spec diffusion_multimodal_bench.md §7 tests): CCA's Fig. 3 rings and
positions, text rows causal; MMA's answer rows causal and the empty question; EE-MLLM's composite visual rows equal
the value path; VAR's row sums, no-op and untouched entries against a loop port of the official procedure; VHR's
scaling; head modulation's bias. Fast (chunked) paths against the reference in forward and gradient; decode rules
against the last rows of the full forward."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import attnx
from attnx.ops.multimodal import attention as mm
from attnx.ops.multimodal import (cca_mask, cca_position_ids, cca_positions_of, cca_rings, composite_mask,
                                  head_modulation_bias, mma_mask, var_redistribute, var_sink_tokens, vhd_scores,
                                  vhr_head_scale)
from attnx.testing.tolerances import assert_close

B, N, K, H, VD = 2, 4, 2, 8, 6
CHUNKED = attnx.Chunked(block_q=8, block_kv=8)

# The paper's Fig. 3 on a 6 x 6 grid, written out by hand: ring 0 is the border, ring 2 the central 2 x 2.
FIG3_RINGS = np.array([[0, 0, 0, 0, 0, 0],
                       [0, 1, 1, 1, 1, 0],
                       [0, 1, 2, 2, 1, 0],
                       [0, 1, 2, 2, 1, 0],
                       [0, 1, 1, 1, 1, 0],
                       [0, 0, 0, 0, 0, 0]])


T = 24  # one length for every attention-level test, so that compiled primitives are shared (CPU budget)
# One sequence layout: CCA's 4 x 4 image at [3, 19); MMA's image [2, 11) and question [11, 16); composite's image
# [3, 12); VAR's image [2, 8) with a text sink 0 and a visual sink 3; VHR reinforces heads 1, 2.
KWARGS = {
    "cca": dict(image_start=3, grid=4),
    "mma": dict(image_span=(2, 11), question_span=(11, 16)),
    "composite": dict(image_span=(3, 12)),
    "vhr": dict(heads=(1, 2), alpha=2.0),
    "head_modulation": dict(tokens=(2, 5), heads=(1, 2), head_scores=(0.5, 2.0), alpha=3.0),
}


def qkv(length=T, seed=0, dtype=jnp.float32):
    kq, kk, kv = jax.random.split(jax.random.key(seed), 3)
    return (jax.random.normal(kq, (B, length, N, H), dtype), jax.random.normal(kk, (B, length, K, H), dtype),
            jax.random.normal(kv, (B, length, K, VD), dtype))


@jax.jit
def masked_softmax(q, k, v, allowed, bias=None):
    """Independent oracle: dense softmax over an explicit [T, S] mask, key/value heads repeated (jitted once for
    every mask of one shape)."""
    G = q.shape[2] // k.shape[2]
    k, v = jnp.repeat(k, G, axis=2), jnp.repeat(v, G, axis=2)
    logits = jnp.einsum("btnh,bsnh->bnts", q, k, precision="highest") / np.sqrt(q.shape[-1])
    if bias is not None:
        logits = logits + bias
    probs = jax.nn.softmax(jnp.where(allowed, logits, -jnp.inf), axis=-1)
    return jnp.einsum("bnts,bsnv->btnv", probs, v, precision="highest"), probs


def padded(x, extra=5):
    """A KV cache with `extra` unwritten (zero) slots after the sequence."""
    return jnp.concatenate([x, jnp.zeros_like(x[:, :extra])], axis=1)


def last_rows(decode, q, k, v, **kwargs):
    """The decode rule for the last two queries over a cache with unwritten slots after them (one shape for every
    mechanism, so the compiled primitives are shared)."""
    return decode(q[:, -2:], padded(k), padded(v), query_positions=jnp.arange(T - 2, T), **kwargs)


def causal(T):
    return np.tril(np.ones((T, T), bool))


# ---- CCA ----------------------------------------------------------------------------------------------------------

def code_cca_mask(start, length, grid):
    """Port of the official loop: causal, mask the image block, then re-open (ring r rows) x (ring <= r columns)
    by selecting on the concentric position ids, as cca.py does."""
    V = grid * grid
    ids = np.concatenate([np.arange(start), FIG3_RINGS.flatten() + start, np.arange(start + grid // 2,
                                                                                   length - V + grid // 2)])
    allowed = causal(length)
    allowed[start:start + V, start:start + V] = False
    for pos in range(start, start + grid // 2):
        keys = np.nonzero((ids <= pos) & (ids >= start))[0]
        rows = np.nonzero((ids == pos) & (ids >= start))[0]
        allowed[np.ix_(rows, keys)] = True
    return allowed, ids


def test_cca_rings_and_positions_reproduce_fig3():
    np.testing.assert_array_equal(cca_rings(6), FIG3_RINGS)
    start, length = 3, 44
    want_mask, want_ids = code_cca_mask(start, length, 6)
    np.testing.assert_array_equal(np.asarray(cca_position_ids(start, length, 6)), want_ids)
    # text after the image continues from start + G/2 = 6; the 36 image tokens use 3 slots
    np.testing.assert_array_equal(np.asarray(cca_position_ids(start, length, 6))[39:], np.arange(6, 11))
    # decode rule of the code: a token at cache index L >= s + V gets L - V + G/2 (the layer hook agrees)
    for index in (39, 40, 57):
        assert int(cca_positions_of(index, start=start, grid=6)) == index - 36 + 3
    np.testing.assert_array_equal(np.asarray(mm.cca_rotary_positions(jnp.arange(length), image_start=start, grid=6)),
                                  want_ids)
    np.testing.assert_array_equal(np.asarray(mm.cca_rotary_positions(jnp.arange(5))), np.arange(5))
    mask = np.asarray(cca_mask(start, length, 6))
    np.testing.assert_array_equal(mask, want_mask)
    image = mask[3:39, 3:39]
    # a ring-0 corner sees the 20 border tokens (also later ones), ring 1 adds its 12, the centre sees all 36
    np.testing.assert_array_equal(image.sum(1), np.array([20, 32, 36])[FIG3_RINGS.flatten()])
    assert image[0, 35] and not image[24, 7]  # corner (0,0) sees (5,5); (4,0) (ring 0) cannot see (1,1) (ring 1)
    np.testing.assert_array_equal(mask[:3], causal(length)[:3])  # prefix rows and text rows: plain causal
    np.testing.assert_array_equal(mask[39:], causal(length)[39:])


# Slow: the CCA decode test (default) checks the same rows through the cache.
@pytest.mark.slow
def test_cca_attention_text_rows_equal_causal():
    q, k, v = qkv()
    out = mm.cca_attention(q, k, v, causal=True, **KWARGS["cca"])
    want, _ = masked_softmax(q, k, v, np.asarray(cca_mask(3, T, 4)))
    assert_close(out, want, jnp.float32)
    plain, _ = masked_softmax(q, k, v, causal(T))
    assert_close(out[:, 19:], plain[:, 19:], jnp.float32)
    assert_close(out[:, :3], plain[:, :3], jnp.float32)
    assert float(jnp.max(jnp.abs(out[:, 3:19] - plain[:, 3:19]))) > 1e-3  # the image rows do change


def test_cca_decode_equals_full_forward_rows():
    q, k, v = qkv()
    full = mm.cca_attention(q, k, v, causal=True, **KWARGS["cca"])
    assert_close(last_rows(mm.cca_decode, q, k, v, **KWARGS["cca"]), full[:, -2:], jnp.float32)
    # a prefill chunk holding the image, into a cache with unwritten slots after it
    assert_close(mm.cca_decode(q, padded(k), padded(v), query_positions=jnp.arange(T), **KWARGS["cca"]), full,
                 jnp.float32)


# ---- MMA ----------------------------------------------------------------------------------------------------------

def code_mma_mask(length, image_start, text_start, text_end, attention_mask_2d):
    mask = causal(length).astype(int)
    mask[image_start:text_start, text_start:text_end] = 1
    return (mask * attention_mask_2d[None, :]).astype(bool)  # padding columns cleared


def test_mma_mask_matches_code_and_answer_rows_are_causal():
    L, image, question = 14, (2, 6), (6, 10)
    pad = np.zeros(L, bool)
    pad[-1] = True
    np.testing.assert_array_equal(np.asarray(mma_mask(L, image, question, jnp.asarray(pad))),
                                  code_mma_mask(L, 2, 6, 10, (~pad).astype(int)))
    mask = np.asarray(mma_mask(L, image, question))
    np.testing.assert_array_equal(mask[10:], causal(L)[10:])  # answer rows
    assert mask[2:6, 6:10].all() and not mask[2:6, 10:].any()  # image sees the question, never the answer
    np.testing.assert_array_equal(np.asarray(mma_mask(L, image, (6, 6))), causal(L))  # empty question


def test_mma_attention_answer_rows_causal_empty_question_and_decode():
    q, k, v = qkv()
    out = mm.mma_attention(q, k, v, causal=True, **KWARGS["mma"])
    want, _ = masked_softmax(q, k, v, np.asarray(mma_mask(T, (2, 11), (11, 16))))
    assert_close(out, want, jnp.float32)
    plain, _ = masked_softmax(q, k, v, causal(T))
    assert_close(out[:, 16:], plain[:, 16:], jnp.float32)
    empty = mm.mma_attention(q, k, v, causal=True, image_span=(2, 11), question_span=(11, 11))
    assert_close(empty, plain, jnp.float32)
    assert_close(last_rows(mm.mma_decode, q, k, v, **KWARGS["mma"]), out[:, -2:], jnp.float32)


# ---- Composite (EE-MLLM) ------------------------------------------------------------------------------------------

def test_composite_visual_rows_are_the_value_path_and_text_rows_causal():
    q, k, v = qkv()
    mask = np.asarray(composite_mask(T, (3, 12)))
    np.testing.assert_array_equal(mask[3:12], np.eye(T, dtype=bool)[3:12])
    np.testing.assert_array_equal(np.delete(mask, range(3, 12), 0), np.delete(causal(T), range(3, 12), 0))
    out = mm.composite_attention(q, k, v, causal=True, **KWARGS["composite"])
    # at the attention level W_o W_v x is the token's own value row (its key/value head under GQA)
    assert_close(out[:, 3:12], jnp.repeat(v, N // K, axis=2)[:, 3:12], jnp.float32)
    assert_close(out, masked_softmax(q, k, v, mask)[0], jnp.float32)
    plain, _ = masked_softmax(q, k, v, causal(T))
    assert_close(out[:, :3], plain[:, :3], jnp.float32)
    assert_close(last_rows(mm.composite_decode, q, k, v, **KWARGS["composite"]), out[:, -2:], jnp.float32)
    assert_close(mm.composite_decode(q[:, 5:7], padded(k), padded(v), query_positions=jnp.arange(5, 7),
                                     **KWARGS["composite"]), out[:, 5:7], jnp.float32)  # visual rows, decoded


# ---- VAR ----------------------------------------------------------------------------------------------------------

def code_var(probs, sinks, im, pa, p, rho, summ):
    """Loop port of HeadFork.run_logic + VARProcessor.attn_redist (prefill: rows after the image only)."""
    probs = np.array(probs, np.float64)
    out = probs.copy()
    vis = np.array([i for i in sinks if im <= i < im + pa])
    txt = np.array([i for i in sinks if not im <= i < im + pa], int)
    if len(vis) == 0:
        return out
    for b, h, t in np.ndindex(probs.shape[:3]):
        row = probs[b, h, t]
        image = row[im:im + pa]
        portion = image[vis - im].sum() / np.sum(image + 1e-6)
        if not (portion <= rho and image.sum() >= summ and t >= im + pa):
            continue
        new = row.copy()
        new[txt] *= p
        new[vis] *= p
        budget = (row[vis].sum() + row[txt].sum()) * (1 - p)
        free = row.copy()
        free[vis] = 0
        new[im:im + pa] += budget * free[im:im + pa] / free[im:im + pa].sum()
        out[b, h, t] = new
    return out


def var_probs(T=12, seed=4):
    """A causal softmax map [B, N, T, T] with a strong visual sink (key 3) and a text sink (key 0)."""
    logits = jax.random.normal(jax.random.key(seed), (B, N, T, T))
    logits = logits.at[..., 3].add(1.0).at[..., 0].add(0.5)
    return jax.nn.softmax(jnp.where(causal(T), logits, -jnp.inf), axis=-1)


def test_var_redistribute_matches_code_keeps_row_sums_and_untouched_entries():
    probs, sinks, span = var_probs(), (0, 3), (2, 8)
    sink = np.zeros(12, bool)
    sink[list(sinks)] = True
    got = np.asarray(var_redistribute(probs, jnp.asarray(sink), span, p=0.6, rho=0.5, summ=0.2))
    want = code_var(probs, sinks, 2, 6, 0.6, 0.5, 0.2)
    np.testing.assert_allclose(got, want, atol=1e-6)
    changed = np.any(np.abs(got - np.asarray(probs)) > 1e-6, axis=-1)
    assert changed.any() and not changed[..., :8].any()  # some rows after the image move, none before its end
    np.testing.assert_allclose(got.sum(-1), np.asarray(probs).sum(-1), atol=1e-6)
    other = np.ones(12, bool)
    other[2:8] = False
    other[list(sinks)] = False
    np.testing.assert_array_equal(got[..., other], np.asarray(probs)[..., other])
    # no qualifying head: no visual sink, or a share threshold no row meets
    no_vis = np.zeros(12, bool)
    no_vis[0] = True
    np.testing.assert_array_equal(np.asarray(var_redistribute(probs, jnp.asarray(no_vis), span)), np.asarray(probs))
    np.testing.assert_array_equal(np.asarray(var_redistribute(probs, jnp.asarray(sink), span, rho=0.0)),
                                  np.asarray(probs))


def test_var_sink_tokens_threshold_on_sink_dims():
    hidden = jax.random.normal(jax.random.key(5), (B, 7, 1024))  # |normed| <= sqrt(D) = 32 > tau
    hidden = hidden.at[0, 2, 5].set(300.0).at[1, 4, 9].set(-300.0).at[1, 6, 11].set(300.0)  # dim 11 is not a sink
    got = np.asarray(var_sink_tokens(hidden, (5, 9), tau=20))
    want = np.zeros((B, 7), bool)
    want[0, 2] = want[1, 4] = True
    np.testing.assert_array_equal(got, want)


def test_var_attention_against_the_probability_oracle_and_decode():
    kwargs = dict(image_span=(2, 8), sinks=(0, 3))
    q, k, v = qkv(seed=6)
    q = q.at[:, :, :, 0].add(3.0)
    k = k.at[:, 3, :, 0].add(3.0)  # key 3 draws attention: a visual sink that some heads lean on
    _, probs = masked_softmax(q, k, v, causal(T))
    moved = code_var(probs, (0, 3), 2, 6, 0.6, 0.5, 0.2)
    assert np.any(np.abs(moved - np.asarray(probs)) > 1e-4)
    want = jnp.einsum("bnts,bsnv->btnv", jnp.asarray(moved, jnp.float32), jnp.repeat(v, N // K, axis=2),
                      precision="highest")
    out = mm.var_attention(q, k, v, causal=True, **kwargs)
    assert_close(out, want, jnp.float32)
    assert_close(mm.var_attention(q, k, v, causal=True), masked_softmax(q, k, v, causal(T))[0], jnp.float32)
    assert_close(last_rows(mm.var_decode, q, k, v, **kwargs), out[:, -2:], jnp.float32)
    with pytest.raises(NotImplementedError, match="reference"):
        mm.var_attention(q, k, v, causal=True, implementation="chunked", **kwargs)


# ---- VHR and head modulation --------------------------------------------------------------------------------------

def test_vhd_and_vhr_scale():
    a = jnp.zeros((1, 1, 4, 2))
    b = a.at[..., 1, 0].set(3.0).at[..., 1, 1].set(4.0).at[..., 2, 0].set(1.0).at[..., 3, 1].set(-2.0)
    vhd = vhd_scores(b, a)
    np.testing.assert_allclose(np.asarray(vhd)[0, 0], [0.0, 5.0, 1.0, 2.0], rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(vhr_head_scale(vhd, 2, alpha=2.0))[0, 0], [1.0, 2.0, 1.0, 2.0])
    np.testing.assert_array_equal(np.asarray(vhr_head_scale(vhd, 0)), np.ones((1, 1, 4)))
    with pytest.raises(ValueError, match="vhr.top_k"):
        vhr_head_scale(vhd, 5)


def test_vhr_attention_scales_the_selected_heads_only():
    q, k, v = qkv()
    plain, _ = masked_softmax(q, k, v, causal(T))
    out = mm.vhr_attention(q, k, v, causal=True, **KWARGS["vhr"])
    assert_close(out, plain * jnp.array([1.0, 2.0, 2.0, 1.0])[:, None], jnp.float32)
    assert_close(last_rows(mm.vhr_decode, q, k, v, **KWARGS["vhr"]), out[:, -2:], jnp.float32)
    scale = jnp.array([1.0, 3.0, 1.0, 0.5])  # a head_scale array (e.g. vhr_head_scale of measured VHD) instead
    assert_close(mm.vhr_attention(q, k, v, causal=True, head_scale=scale), plain * scale[:, None], jnp.float32)


def test_head_modulation_bias_multiplies_selected_weights_by_one_plus_alpha_s():
    selected = jnp.zeros(T, bool).at[jnp.array([2, 5])].set(True)
    scores = jnp.array([0.0, 0.5, 2.0, 0.0])
    bias = np.asarray(head_modulation_bias(selected, scores, alpha=3.0))
    assert bias.shape == (4, 1, T)
    np.testing.assert_allclose(bias[:, 0, 2], np.log1p(3.0 * np.array([0.0, 0.5, 2.0, 0.0])), rtol=1e-6)
    assert not np.delete(bias, [2, 5], axis=-1).any()
    # attention level: selected keys' unnormalised weights grow by (1 + alpha s_h), then rows renormalise
    q, k, v = qkv()
    out = mm.head_modulation_attention(q, k, v, causal=True, **KWARGS["head_modulation"])
    _, probs = masked_softmax(q, k, v, causal(T))
    factor = jnp.where(selected, 1.0 + 3.0 * scores[:, None, None], 1.0)  # [N, 1, S]
    weights = probs * factor
    want = jnp.einsum("bnts,bsnv->btnv", weights / weights.sum(-1, keepdims=True), jnp.repeat(v, 2, axis=2),
                      precision="highest")
    assert_close(out, want, jnp.float32)
    assert_close(last_rows(mm.head_modulation_decode, q, k, v, **KWARGS["head_modulation"]), out[:, -2:],
                 jnp.float32)


# ---- Fast paths ---------------------------------------------------------------------------------------------------

FNS = {"cca": mm.cca_attention, "mma": mm.mma_attention, "composite": mm.composite_attention,
       "vhr": mm.vhr_attention, "head_modulation": mm.head_modulation_attention}


def _outputs_and_gradients(implementation):
    """Every mask / bias / head-scale mechanism through one implementation, in one compiled function (one compile
    per implementation keeps this within the CPU budget): outputs and the gradient of a joint loss."""
    def loss(q, k, v):
        outs = {name: fn(q, k, v, causal=True, implementation=implementation, **KWARGS[name])
                for name, fn in FNS.items()}
        return sum(jnp.sum(jnp.sin(o) * (i + 1)) for i, o in enumerate(outs.values())), outs
    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(*qkv(seed=9))


def test_chunked_paths_match_reference_forward_and_gradient():
    (_, got), got_grads = _outputs_and_gradients(CHUNKED)
    (_, want), want_grads = _outputs_and_gradients("reference")
    for name in FNS:
        assert_close(got[name], want[name], jnp.float32, what=name)
    for g, w, what in zip(got_grads, want_grads, ("query", "key", "value")):
        assert_close(g, w, jnp.float32, kind="gradient", what=what)


# ---- Errors -------------------------------------------------------------------------------------------------------

def test_errors_name_the_argument():
    q, k, v = qkv()
    with pytest.raises(ValueError, match="cca.grid"):
        cca_mask(0, 16, 3)
    with pytest.raises(ValueError, match="cca: give both"):
        mm.cca_attention(q, k, v, causal=True, image_start=0)
    with pytest.raises(ValueError, match="cca.length"):
        cca_position_ids(2, 10, 4)
    with pytest.raises(ValueError, match="mma.question_span"):
        mm.mma_attention(q, k, v, causal=True, image_span=(0, 2), question_span=(4, 3))
    with pytest.raises(ValueError, match="pattern CS"):
        mm.composite_attention(q, k, v, causal=False, image_span=(0, 2))
    with pytest.raises(ValueError, match="head_modulation.heads"):
        mm.head_modulation_attention(q, k, v, causal=True, tokens=(1,), heads=(4,))
    with pytest.raises(ValueError, match="head_modulation.head_scores"):
        mm.head_modulation_attention(q, k, v, causal=True, tokens=(1,), heads=(0,), head_scores=(-1.0,))
    with pytest.raises(ValueError, match="var.p"):
        mm.var_attention(q, k, v, causal=True, image_span=(0, 2), sinks=(1,), p=1.5)


def test_the_layer_rotates_cca_tokens_at_their_concentric_positions():
    """The attention layer applies the registry's rotary_positions hook: a cca layer rotates its queries and keys at
    cca_position_ids, not at the sequence indices."""
    from flax import nnx

    from attnx.rotary import rotary_embedding
    from models.layers.attention import Attention

    kwargs = {"image_start": 1, "grid": 4}
    layer = Attention(16, 2, 1, 8, kind="cca", kind_kwargs=kwargs, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(0), (1, 20, 16))
    heads = layer.project_heads(x)
    query, key, _ = layer.rotate(*heads)
    positions = jnp.asarray(cca_position_ids(1, 20, 4))
    np.testing.assert_allclose(query, rotary_embedding(heads[0], positions), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(key, rotary_embedding(heads[1], positions), rtol=1e-6, atol=1e-6)
    assert int(positions.max()) < 19  # the image's 16 tokens share ring positions
