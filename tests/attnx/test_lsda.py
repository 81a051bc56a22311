"""CrossFormer LSDA (attnx/ops/grouped/lsda.py): fast path vs reference, the closed-form group masks of the spec
(vision_mechanisms.md §5(e)), LDA as SDA of a permuted grid, group/ungroup, the DPB table as a Swin gather, the
global-group rule and argument errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import attnx
from attnx.ops.grouped.lsda import (bias_within_group, dynamic_position_bias, group_layout, group_tokens,
                                    lsda_attention, lsda_reference, relative_offsets, relative_position_index,
                                    resolve_grouping, ungroup_tokens)
from attnx.testing.tolerances import assert_close

RNG = np.random.default_rng(0)
N, K, H, V = 4, 2, 8, 6


def _normal(*shape):
    return jnp.asarray(RNG.standard_normal(shape), jnp.float32)


def _qkv(T, kv_heads=K):
    return _normal(2, T, N, H), _normal(2, T, kv_heads, H), _normal(2, T, kv_heads, V)


def _table(grid, group_size, mode="sda", interval=None):
    _, G, _ = resolve_grouping(grid, group_size, mode, interval)
    return _normal((2 * G - 1) ** len(grid), N)


def _coords(grid):
    """[T, 2] (y, x) of row-major tokens."""
    return np.stack(np.unravel_index(np.arange(int(np.prod(grid))), grid), axis=-1)


@jax.jit
def _oracle(q, k, v, mask, bias):
    return attnx.dot_product_attention(q, k, v, bias[None], mask=mask, implementation="reference")


def _dense(q, k, v, mask, bias=None):
    """The shared oracle: dense softmax attention under a boolean [T, T] mask (and a [N, T, T] bias)."""
    bias = np.zeros((N, *mask.shape), np.float32) if bias is None else bias
    return _oracle(q, k, v, jnp.asarray(mask), jnp.asarray(bias, jnp.float32))


# Jitted once per shape: eager dispatch of the gathers and einsums costs more than compiling them.
_lsda = jax.jit(lsda_attention, static_argnames=("grid", "group_size", "mode", "interval"))


# grid, mode, G, I: padded SDA; HEAD LDA with padding, two regions per axis and all-padding groups. ICLR LDA and
# 1-D sequences are checked against the dense oracle below.
CASES = [((6, 5), "sda", 4, None), ((9, 7), "lda", 2, 4)]


@pytest.mark.parametrize("grid,mode,group_size,interval", CASES)
def test_fast_path_matches_reference_forward_and_gradients(grid, mode, group_size, interval):
    kw = dict(grid=grid, group_size=group_size, mode=mode, interval=interval)
    q, k, v = _qkv(int(np.prod(grid)))
    table = _table(grid, group_size, mode, interval)
    cotangent = _normal(2, q.shape[1], N, V)

    def loss(fn):
        return lambda *args: jnp.sum(fn(*args[:3], position_bias=args[3], **kw) * cotangent)

    both = jax.jit(lambda *args: (lsda_attention(*args[:3], position_bias=args[3], **kw),
                                  lsda_reference(*args[:3], position_bias=args[3], **kw),
                                  jax.grad(loss(lsda_attention), argnums=(0, 1, 2, 3))(*args),
                                  jax.grad(loss(lsda_reference), argnums=(0, 1, 2, 3))(*args)))
    fast, reference, fast_grads, reference_grads = both(q, k, v, table)
    assert fast.shape == (2, q.shape[1], N, V)
    assert_close(fast, reference, jnp.float32, what="lsda forward")
    for name, a, b in zip("qkvb", fast_grads, reference_grads):
        assert float(jnp.max(jnp.abs(b))) > 0, name  # every input reaches the output
        assert_close(a, b, jnp.float32, kind="gradient", what=f"lsda d{name}")


def test_sda_is_dense_attention_within_adjacent_squares():
    grid, G = (6, 5), 4  # padded to 8 x 8: the bottom/right groups are partly padding, which nobody attends to
    q, k, v = _qkv(30)
    c = _coords(grid)
    same = (c[:, None, 0] // G == c[None, :, 0] // G) & (c[:, None, 1] // G == c[None, :, 1] // G)
    assert_close(_lsda(q, k, v, grid=grid, group_size=G), _dense(q, k, v, same), jnp.float32)


def test_lda_is_dense_attention_over_tokens_spaced_by_the_interval():
    q, k, v = _qkv(64)
    c = _coords((8, 8))
    # ICLR form, I = h / G = 2: same(y mod I, x mod I)
    same = (c[:, None, 0] % 2 == c[None, :, 0] % 2) & (c[:, None, 1] % 2 == c[None, :, 1] % 2)
    assert_close(_lsda(q, k, v, grid=(8, 8), group_size=4, mode="lda"), _dense(q, k, v, same), jnp.float32)
    # HEAD form with regions of G * I = 4 tokens (G = 2, I = 2): same region and same offset mod I
    region = lambda a, b: (a // 4 == b // 4) & (a % 2 == b % 2)
    same = region(c[:, None, 0], c[None, :, 0]) & region(c[:, None, 1], c[None, :, 1])
    assert_close(_lsda(q, k, v, grid=(8, 8), group_size=2, mode="lda", interval=2),
                 _dense(q, k, v, same), jnp.float32)


def test_group_bias_is_the_dpb_of_member_offsets():
    """With the bias: the dense oracle with bias[n, t, s] = table[Swin index of member offsets] inside a group."""
    grid, G = (8, 8), 4
    q, k, v = _qkv(64)
    table = _table(grid, G)
    c = _coords(grid)
    same = (c[:, None, 0] // G == c[None, :, 0] // G) & (c[:, None, 1] // G == c[None, :, 1] // G)
    delta = (c[:, None, :] % G) - (c[None, :, :] % G) + G - 1
    bias = np.asarray(table)[delta[..., 0] * (2 * G - 1) + delta[..., 1]].transpose(2, 0, 1)
    assert_close(_lsda(q, k, v, grid=grid, group_size=G, position_bias=table),
                 _dense(q, k, v, same, bias), jnp.float32)


def test_lda_equals_sda_of_the_permuted_grid():
    """ICLR LDA (I = h / G): token (y, x) = (g I + i, ...) is member g of group i; moving it to (i G + g, ...) makes
    the same groups adjacent squares with the same member coordinates, so SDA there gives the same outputs."""
    grid, G = (6, 6), 3
    interval = 2
    q, k, v = _qkv(36)
    table = _table(grid, G)
    axis = np.arange(6)
    moved = (axis % interval) * G + axis // interval  # new coordinate of old coordinate y
    c = _coords(grid)
    new_index = moved[c[:, 0]] * 6 + moved[c[:, 1]]
    order = np.argsort(new_index)  # permuted[t'] = x[order[t']]
    lda = _lsda(q, k, v, grid=grid, group_size=G, mode="lda", position_bias=table)
    permute = lambda x: x[:, order]
    sda = _lsda(permute(q), permute(k), permute(v), grid=grid, group_size=G, position_bias=table)
    assert_close(sda, lda[:, order], jnp.float32)


@pytest.mark.parametrize("grid,mode,group_size,interval", CASES + [((9,), "lda", 2, 2)])
def test_group_then_ungroup_is_the_identity(grid, mode, group_size, interval):
    x = _normal(2, int(np.prod(grid)), 3, 5)
    layout = group_layout(grid, *resolve_grouping(grid, group_size, mode, interval))
    grouped = group_tokens(x, layout)
    assert grouped.shape == (2, layout.num_groups, layout.group_tokens, 3, 5)
    np.testing.assert_array_equal(np.asarray(ungroup_tokens(grouped, layout)), np.asarray(x))
    padding = layout.token_index == x.shape[1]
    assert np.all(np.asarray(grouped)[:, padding] == 0)
    # every real token sits in exactly one (group, member) slot
    assert sorted(layout.token_index[~padding].tolist()) == list(range(x.shape[1]))


def _swin_relative_position_index(G):
    """Swin's construction (Liu et al., 2021, `WindowAttention`), written out separately from the library's."""
    coords = np.stack(np.meshgrid(np.arange(G), np.arange(G), indexing="ij")).reshape(2, -1)
    relative = (coords[:, :, None] - coords[:, None, :]).transpose(1, 2, 0).copy()
    relative[:, :, 0] += G - 1
    relative[:, :, 1] += G - 1
    relative[:, :, 0] *= 2 * G - 1
    return relative.sum(-1)


def _dpb_params(P, heads):
    params = {"proj_w": _normal(2, P), "proj_b": _normal(P)}
    for i, out in ((1, P), (2, P), (3, heads)):
        params.update({f"ln{i}_scale": _normal(P), f"ln{i}_bias": _normal(P), f"fc{i}_w": _normal(P, out),
                       f"fc{i}_b": _normal(out)})
    return params


def _mlp(params, offsets):
    """DynamicPosBias.forward with residual=False, in numpy float64."""
    p = {name: np.asarray(value, np.float64) for name, value in params.items()}
    x = offsets @ p["proj_w"] + p["proj_b"]
    for i in (1, 2, 3):
        x = (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + 1e-5)
        x = np.maximum(x * p[f"ln{i}_scale"] + p[f"ln{i}_bias"], 0) @ p[f"fc{i}_w"] + p[f"fc{i}_b"]
    return x


def test_dpb_table_is_the_mlp_of_offsets_gathered_like_swin():
    G = 3
    params = _dpb_params(4, N)
    dpb = jax.jit(dynamic_position_bias, static_argnames=("group_size", "ndim", "residual"))
    table = dpb(params, G)
    span = np.arange(1 - G, G)
    mother = np.stack(np.meshgrid(span, span, indexing="ij")).reshape(2, -1).T  # the code's `biases` buffer
    np.testing.assert_array_equal(relative_offsets(G), mother)
    np.testing.assert_allclose(np.asarray(table), _mlp(params, mother), atol=2e-5, rtol=2e-5)
    np.testing.assert_array_equal(relative_position_index(G), _swin_relative_position_index(G))
    layout = group_layout((6, 6), "sda", G)
    bias = np.asarray(bias_within_group(table, layout))  # [N, M, M]
    members = layout.member_coords
    direct = _mlp(params, (members[:, None] - members[None, :]).reshape(-1, 2)).reshape(G * G, G * G, N)
    np.testing.assert_allclose(bias, direct.transpose(2, 0, 1), atol=2e-5, rtol=2e-5)
    # 1-D: offsets (0, dx), a table of 2G - 1 rows
    np.testing.assert_allclose(np.asarray(dpb(params, G, ndim=1)),
                               _mlp(params, np.stack([np.zeros(2 * G - 1), span], -1)), atol=2e-5, rtol=2e-5)
    residual = dpb(params, G, residual=True)
    assert float(jnp.max(jnp.abs(residual - table))) > 1e-3


def test_small_grids_form_one_global_group():
    """min(grid) <= G: SDA with G = min(grid) (CrossFormerBlock), so a square grid is one group, LDA or not."""
    assert resolve_grouping((4, 4), 7, "lda", 8) == ("sda", 4, 1)
    assert resolve_grouping((4, 6), 4, "lda") == ("sda", 4, 1)
    assert resolve_grouping((8, 8), 4, "lda") == ("lda", 4, 2)
    q, k, v = _qkv(64)  # 64 tokens throughout: the dense oracle compiles once for these tests
    table = _table((8, 8), 10)
    c = _coords((8, 8))
    delta = c[:, None] - c[None, :] + 7
    bias = np.asarray(table)[delta[..., 0] * 15 + delta[..., 1]].transpose(2, 0, 1)
    everything = np.ones((64, 64), bool)
    out = _lsda(q, k, v, grid=(8, 8), group_size=10, mode="lda", position_bias=table)
    assert_close(out, _dense(q, k, v, everything, bias), jnp.float32)


def test_one_dimensional_sequences_without_grid():
    q, k, v = _qkv(64)
    t = np.arange(64)
    assert_close(_lsda(q, k, v, group_size=5), _dense(q, k, v, t[:, None] // 5 == t[None] // 5), jnp.float32)
    assert_close(_lsda(q, k, v, group_size=4, mode="lda"),  # I = ceil(64 / 4) = 16
                 _dense(q, k, v, t[:, None] % 16 == t[None] % 16), jnp.float32)


def test_errors_name_the_argument():
    q, k, v = _qkv(16)
    with pytest.raises(ValueError, match="causal"):
        lsda_attention(q, k, v, causal=True, grid=(4, 4), group_size=2)
    with pytest.raises(ValueError, match="cross attention"):
        lsda_attention(q, k[:, :9], v[:, :9], grid=(4, 4), group_size=2)
    with pytest.raises(ValueError, match="pooling='mean'"):
        lsda_attention(q, k, v, grid=(3, 5), group_size=2)
    with pytest.raises(ValueError, match="lsda.mode"):
        lsda_attention(q, k, v, grid=(4, 4), group_size=2, mode="long")
    with pytest.raises(ValueError, match="lsda.group_size"):
        lsda_attention(q, k, v, grid=(4, 4), group_size=0)
    with pytest.raises(ValueError, match=r"position_bias.*\[9, 4\]"):
        lsda_attention(q, k, v, grid=(4, 4), group_size=2, position_bias=jnp.zeros((25, 4)))
    with pytest.raises(ValueError, match="lsda.grid"):
        lsda_attention(q, k, v, grid=(2, 2, 4), group_size=2)


def test_registry_entry():
    spec = attnx.get_attention("lsda")
    assert spec.spatial and spec.patterns == frozenset({"NS"})
    assert "2108.00154" in spec.paper
    assert attnx.get_attention("crossformer") is spec
