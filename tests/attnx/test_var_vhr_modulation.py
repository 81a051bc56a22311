"""The per-layer and scoring pieces of the multimodal head transforms (spec diffusion_multimodal_bench.md §7):
VHR's per-layer head selection (median rule with surge filter, or a fixed per-layer top-K), the token scores and
logit modulation of "Fixing Imbalanced Attention" (PAINT's code) against explicit numpy ports, and VAR's layer
schedule. All pure-array tests on tiny shapes (no model, no attention compile)."""

import jax.numpy as jnp
import numpy as np
import pytest

from attnx.ops.multimodal import heads
from attnx.ops.multimodal import var as var_ops


# ---- VHR ------------------------------------------------------------------------------------------------------------

def np_vhr_selection(vhd):
    """Loop reference over rows: above the median, at most mean + unbiased std."""
    flat = vhd.reshape(-1, vhd.shape[-1])
    out = np.zeros(flat.shape, bool)
    for r, row in enumerate(flat):
        bound = row.mean() + row.std(ddof=1)
        med = np.median(row)
        out[r] = [(x > med) and (x <= bound) for x in row]
    return out.reshape(vhd.shape)


def test_vhr_layer_selection_matches_the_rule_and_drops_surges():
    rng = np.random.default_rng(0)
    vhd = rng.gamma(2.0, size=(3, 2, 5, 8)).astype(np.float32)  # [L, B, T, N]
    vhd[0, 0, 0, 3] = 50.0  # a surge: above the median but filtered out
    got = np.asarray(heads.vhr_layer_selection(vhd))
    np.testing.assert_array_equal(got, np_vhr_selection(vhd))
    assert not got[0, 0, 0, 3]
    # hand example: median 2.5, mean + std = 4.2..., so 5 is a surge and only 3 is reinforced
    np.testing.assert_array_equal(np.asarray(heads.vhr_layer_selection(jnp.array([1.0, 5.0, 3.0, 2.5, 0.1]))),
                                  [False, False, True, False, False])


def test_vhr_layer_scales_select_per_layer():
    vhd = np.array([[0.0, 1.0, 2.0, 3.0], [3.0, 2.0, 1.0, 0.0]], np.float32)  # two layers, opposite orders
    np.testing.assert_array_equal(np.asarray(heads.vhr_layer_scales(vhd, alpha=2.0, top_k=1)),
                                  [[1, 1, 1, 2], [2, 1, 1, 1]])
    want = 1.0 + 2.0 * np_vhr_selection(vhd)
    np.testing.assert_array_equal(np.asarray(heads.vhr_layer_scales(vhd, alpha=3.0)), want)
    with pytest.raises(ValueError, match="vhr.vhd_per_layer"):
        heads.vhr_layer_scales(np.ones(4))
    with pytest.raises(ValueError, match="vhr.vhd"):
        heads.vhr_layer_selection(np.ones((3, 1)))


# ---- Fixing Imbalanced Attention (PAINT) ----------------------------------------------------------------------------

def np_paint_sets(first, late, ratio=0.25):
    """Port of the code's update_modpai_alpha / get_top_ratio on one image (numpy percentiles and sorting)."""
    V = first.shape[-1]
    top_scores, bottom_scores = first.sum(0), late.sum(0)
    top = set(np.argsort(-top_scores, kind="stable")[:int(V * ratio)].tolist())
    q1, q3 = np.percentile(bottom_scores, 25), np.percentile(bottom_scores, 75)
    n_out = int(np.sum(bottom_scores > q3 + 1.5 * (q3 - q1)))
    bottom = set(np.argsort(-bottom_scores, kind="stable")[:int(V * (n_out / V))].tolist())
    local, summary = np.zeros(V, bool), np.zeros(V, bool)
    local[list(top - bottom)] = True
    summary[list(bottom)] = True
    return local, summary


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_paint_token_sets_match_the_code(seed):
    rng = np.random.default_rng(seed)
    first = rng.dirichlet(np.ones(16), size=3).astype(np.float32)  # [heads, V]: CLS rows over 16 patches
    late = rng.dirichlet(np.ones(16), size=3).astype(np.float32)
    late[:, [2, 9]] += 2.0  # register-like summary tokens: IQR outliers
    first[:, 2] += 1.0  # a summary token that also ranks high locally: the code drops it from the local set
    local, summary = (np.asarray(x) for x in heads.paint_token_sets(first, late))
    want_local, want_summary = np_paint_sets(first, late)
    np.testing.assert_array_equal(summary, want_summary)
    np.testing.assert_array_equal(local, want_local)
    assert summary[[2, 9]].all() and not local[2] and not (local & summary).any()
    assert 0 < local.sum() <= 4 - 1  # int(0.25 * 16) minus at least the overlap at token 2


def test_paint_modulate_logits_matches_the_code_on_the_selected_rows():
    rng = np.random.default_rng(3)
    z = rng.normal(size=(2, 3, 5, 10)).astype(np.float32)  # [B, N, T, S]
    local = np.zeros(10, bool); local[[4, 6]] = True
    summary = np.zeros(10, bool); summary[[1]] = True
    rows = np.zeros(5, bool); rows[-1] = True  # the code touches the last query row only
    want = z.copy()  # the code's in-place updates, written out
    want[:, :, -1, [4, 6]] = np.abs(z[:, :, -1, [4, 6]]) * 0.7 + z[:, :, -1, [4, 6]]
    want[:, :, -1, [1]] = np.abs(z[:, :, -1, [1]]) * 0.3 + z[:, :, -1, [1]]
    got = heads.paint_modulate_logits(z, local, summary, alpha=0.7, beta=0.3, rows=rows)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-6)
    masked = jnp.asarray(z).at[..., 4].set(-jnp.inf)  # masked keys stay masked (no inf - inf)
    assert np.isneginf(np.asarray(heads.paint_modulate_logits(masked, local, summary))[..., 4]).all()
    placed = np.asarray(heads.place_image_tokens(np.array([True, False, True]), 2, 8))
    np.testing.assert_array_equal(placed, [0, 0, 1, 0, 1, 0, 0, 0])
    with pytest.raises(ValueError, match="head_modulation.image_start"):
        heads.place_image_tokens(np.ones(3, bool), 6, 8)
    with pytest.raises(ValueError, match="head_modulation.ratio"):
        heads.paint_local_tokens(np.ones((2, 4)), ratio=1.5)
    with pytest.raises(ValueError, match="head_modulation.cls_attn_late"):
        heads.paint_summary_tokens(np.ones(4))


# ---- VAR --------------------------------------------------------------------------------------------------------

def test_var_layer_schedule_and_layer_attention():
    assert var_ops.var_layer_schedule(6) == (False, False, True, True, True, False)
    assert var_ops.var_layer_schedule(4, first=0, skip_last=False) == (True,) * 4
    entries = var_ops.var_layer_attention(4, (1, 4), (0, 2))
    assert [e[0] for e in entries] == ["var"] * 4
    assert [e[1]["sinks"] for e in entries] == [(), (), (0, 2), ()]
    assert all(e[1]["image_span"] == (1, 4) for e in entries)
    with pytest.raises(ValueError, match="var.num_layers"):
        var_ops.var_layer_schedule(0)
    with pytest.raises(ValueError, match="var.p"):
        var_ops.var_layer_attention(4, (1, 4), (0,), p=2.0)


def test_vhr_layer_attention_entries():
    entries = heads.vhr_layer_attention(((0,), (1, 3)), alpha=2.0)
    assert entries == (("vhr", {"heads": (0,), "alpha": 2.0}), ("vhr", {"heads": (1, 3), "alpha": 2.0}))
    with pytest.raises(ValueError, match="vhr.layer_heads"):
        heads.vhr_layer_attention((0, 1))


# ---- head_modulation mode='code' (the registered entry) ------------------------------------------------------------

import jax  # noqa: E402

from attnx.ops.multimodal import modulation  # noqa: E402
from attnx.testing.tolerances import assert_close  # noqa: E402

TC = 7
CODE = dict(mode="code", local_tokens=(1, 3), summary_tokens=(2,), alpha=0.7, beta=0.3, from_position=4)


def code_oracle(q, k, v, from_position=4):
    """Written-out oracle: per-head logits, the code's in-place updates on rows >= from_position, causal softmax."""
    G = q.shape[2] // k.shape[2]
    k, v = jnp.repeat(k, G, axis=2), jnp.repeat(v, G, axis=2)
    z = jnp.einsum("btnh,bsnh->bnts", q, k, precision="highest") / np.sqrt(q.shape[-1])
    r = slice(from_position, None)
    z = z.at[:, :, r, [1, 3]].add(0.7 * jnp.abs(z[:, :, r, [1, 3]]))
    z = z.at[:, :, r, [2]].add(0.3 * jnp.abs(z[:, :, r, [2]]))
    z = jnp.where(jnp.tril(jnp.ones((q.shape[1],) * 2, bool)), z, -jnp.inf)
    return jnp.einsum("bnts,bsnv->btnv", jax.nn.softmax(z, axis=-1), v, precision="highest")


@jax.jit
def code_mode_everything(q, k, v):
    """Forward, gradients and decode of mode='code' and the oracle in one compiled function (CPU budget)."""
    fn = lambda q, k, v: modulation.head_modulation_attention(q, k, v, causal=True, **CODE)  # noqa: E731
    loss = lambda f: lambda q, k, v: jnp.sum(jnp.sin(f(q, k, v)))  # noqa: E731
    pad = lambda x: jnp.concatenate([x, jnp.zeros_like(x[:, :3])], axis=1)  # noqa: E731  unwritten cache slots
    dec = modulation.head_modulation_decode(q[:, -2:], pad(k), pad(v), query_positions=jnp.arange(TC - 2, TC), **CODE)
    return (fn(q, k, v), code_oracle(q, k, v), code_oracle(q, k, v, from_position=TC), dec,
            jax.grad(loss(fn), argnums=(0, 1, 2))(q, k, v), jax.grad(loss(code_oracle), argnums=(0, 1, 2))(q, k, v))


def test_head_modulation_code_mode_matches_the_oracle_forward_gradient_and_decode():
    kq, kk, kv = jax.random.split(jax.random.key(5), 3)
    q, k, v = (jax.random.normal(kq, (1, TC, 2, 8)), jax.random.normal(kk, (1, TC, 1, 8)),
               jax.random.normal(kv, (1, TC, 1, 4)))
    out, want, plain, dec, got_grads, want_grads = code_mode_everything(q, k, v)
    assert_close(out, want, jnp.float32)
    assert_close(out[:, :4], plain[:, :4], jnp.float32)  # rows before from_position are plain causal
    assert not np.allclose(np.asarray(out[:, 4:]), np.asarray(plain[:, 4:]))
    for g, w in zip(got_grads, want_grads):
        assert_close(g, w, jnp.float32, kind="gradient")
    assert_close(dec, out[:, -2:], jnp.float32)  # decode = the last rows of the full forward
    with pytest.raises(NotImplementedError, match="mode='code'"):
        modulation.head_modulation_attention(q, k, v, causal=True, implementation="chunked", **CODE)
    with pytest.raises(ValueError, match="head_modulation.mode"):
        modulation.head_modulation_attention(q, k, v, causal=True, mode="paint")
    with pytest.raises(ValueError, match="head_modulation.from_position"):
        modulation.head_modulation_attention(q, k, v, causal=True, **dict(CODE, from_position=-1))


BIAS = dict(heads=(1,), head_scores=(3.0,), alpha=1.0)


def both_modes(q, k, v, tokens):
    """(mode 'bias', mode 'code') outputs for `tokens` (static indices or a bool [B, S] array), one compile each."""
    code_summary = () if isinstance(tokens, tuple) else jnp.zeros_like(tokens)
    return (modulation.head_modulation_attention(q, k, v, causal=True, tokens=tokens, **BIAS),
            modulation.head_modulation_attention(q, k, v, causal=True, mode="code", local_tokens=tokens,
                                                 summary_tokens=code_summary))


modes_with_array, modes_with_indices = jax.jit(both_modes), jax.jit(both_modes, static_argnames=("tokens",))


def test_head_modulation_takes_per_sequence_token_masks_in_both_modes():
    """A bool [B, S] token array gives each sequence the result of its own static index tuple (modes 'bias' and
    'code'); a wrong length is refused."""
    rng = np.random.default_rng(4)
    q, k, v = (jnp.asarray(rng.standard_normal((2, 6, 2, 8)), jnp.float32) for _ in range(3))
    sets = [(1, 4), (0, 2, 5)]
    masks = jnp.asarray([[i in s for i in range(6)] for s in sets])
    got = modes_with_array(q, k, v, masks)
    for b, tokens in enumerate(sets):
        want = modes_with_indices(q[b:b + 1], k[b:b + 1], v[b:b + 1], tokens)
        for mode in range(2):
            assert_close(got[mode][b:b + 1], want[mode], jnp.float32)
    # a run-time set shorter than the keys (prompt-length masks over a KV cache) is padded with False, a longer one
    # cut (as static indices past the sequence are dropped); a non-bool array is refused, naming the argument
    np.testing.assert_array_equal(heads.fit_token_mask("t", masks[:, :4], 6), masks.at[:, 4:].set(False))
    np.testing.assert_array_equal(heads.fit_token_mask("t", masks, 4), masks[:, :4])
    with pytest.raises(ValueError, match="head_modulation.tokens"):
        modulation.head_modulation_attention(q, k, v, causal=True, tokens=masks.astype(jnp.int32), **BIAS)
    with pytest.raises(ValueError, match="head_modulation.local_tokens"):
        modulation.head_modulation_attention(q, k, v, causal=True, mode="code", local_tokens=jnp.ones(6))
