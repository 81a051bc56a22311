"""Neighbourhood attention (spec vision_mechanisms.md §3 (e)): (1) gather path == dense masked reference, forward and
gradients (1-D/2-D/3-D, dilation, stride, even kernels, causal axes, RPB, GQA); (2) prod(k) distinct keys per row;
(3) k = L is full attention; (4) k = 1 returns v; (5) dilated NA == NA on each dilation sub-grid; (6) causal 1-D
with k >= L is causal attention; (7) the mask is asymmetric only near borders; (8) windows and RPB indices equal a
loop over NATTEN v0.15.1's get_window_start / get_pb_start; plus stride = k is blocked attention, the block mask,
the decode rule, and argument errors."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import attnx
from attnx.ops.local.neighborhood import (na_block_mask, na_mask, na_tables, neighborhood_attention,
                                          neighborhood_decode)
from attnx.ops.local.tables import coordinates
from attnx.testing.tolerances import assert_close

B, N, K, H, V = 2, 4, 2, 8, 6


def inputs(T, seed=0, heads=(N, K)):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((B, T, heads[0], H))
    k = rng.standard_normal((B, T, heads[1], H))
    v = rng.standard_normal((B, T, heads[1], V))
    return tuple(jnp.asarray(x, jnp.float32) for x in (q, k, v))


def rpb_table(kernel, seed=1):
    return jnp.asarray(np.random.default_rng(seed).standard_normal((N, *(2 * k - 1 for k in kernel))), jnp.float32)


@functools.partial(jax.jit, static_argnames=("options", "tile"))
def both_paths(q, k, v, rpb, cotangent, options, tile):
    """Forward and input gradients of the gather path, the tiled path (tokens permuted into `tile`s) and the
    reference, in one compiled function."""
    options = dict(options)

    def loss(impl, q, k, v, rpb):
        extra = dict(tile=tile) if impl == "tiled" else {}
        out = neighborhood_attention(q, k, v, rpb=rpb, implementation=impl, **options, **extra)
        return jnp.sum(out * cotangent), out

    results = {}
    for impl in ("gather", "tiled", "reference"):
        (_, out), grads = jax.value_and_grad(functools.partial(loss, impl), argnums=(0, 1, 2, 3), has_aux=True)(
            q, k, v, rpb)
        results[impl] = (out, grads)
    return results


# Two compiled cases cover the options between them (compiles dominate the run time); the causal 1-D gather path
# is also checked against the dense decode rule below, and the window tables against NATTEN's loop. TILES: the
# tiled path's tile per case (small, so that the permutation, the block skipping and ragged neighbourhoods across
# tiles are all exercised).
TILES = {"2d-dilated-strided": (3, 1), "3d-even-kernel-causal-axis": (1, 2, 5)}
CASES = {
    "2d-dilated-strided": dict(grid=(6, 7), kernel_size=3, dilation=(2, 1), stride=(1, 3)),
    "3d-even-kernel-causal-axis": dict(grid=(3, 4, 5), kernel_size=(2, 3, 2), dilation=(1, 1, 2),
                                       causal_axes=(True, False, False)),
}


@pytest.mark.parametrize("case", CASES, ids=list(CASES))
def test_gather_equals_dense_reference(case):
    options = CASES[case]
    grid = options["grid"]
    kernel = options["kernel_size"]
    kernel = (kernel,) * len(grid) if isinstance(kernel, int) else kernel
    q, k, v = inputs(math.prod(grid))
    cotangent = jnp.asarray(np.random.default_rng(2).standard_normal((B, math.prod(grid), N, V)), jnp.float32)
    results = both_paths(q, k, v, rpb_table(kernel), cotangent, tuple(sorted(options.items())), TILES[case])
    want, want_grads = results["reference"]
    for impl in ("gather", "tiled"):
        out, grads = results[impl]
        assert_close(out, want, jnp.float32, what=f"{case} {impl} forward")
        for name, got, expected in zip(("query", "key", "value", "rpb"), grads, want_grads):
            assert_close(got, expected, jnp.float32, kind="gradient", what=f"{case} {impl} d{name}")


@pytest.mark.parametrize("grid, kernel, dilation, stride", [
    ((9,), (4,), (2,), (1,)), ((6, 7), (3, 5), (2, 1), (1, 1)), ((4, 5, 6), (3, 2, 3), (1, 2, 2), (2, 1, 3))])
def test_every_row_has_prod_k_distinct_keys(grid, kernel, dilation, stride):
    causal = (False,) * len(grid)
    mask = na_mask(grid, kernel, dilation, stride, causal)
    assert np.all(mask.sum(axis=1) == math.prod(kernel))
    index, valid, _ = na_tables(grid, kernel, dilation, stride, causal)
    assert valid.all()
    assert all(len(set(row)) == math.prod(kernel) for row in index)
    rows = np.repeat(np.arange(len(index)), index.shape[1])
    assert np.array_equal(np.argwhere(mask), np.unique(np.stack([rows, index.ravel()], 1), axis=0))


@jax.jit
def small_cases(q, k, v):
    """(3) k = L on every axis, (4) k = 1, (6) causal 1-D with k >= L, each beside its expected value; bfloat16
    inputs on the gather path beside the float32 reference."""
    q2, k2, v2 = q[:, :12], k[:, :12], v[:, :12]
    low = [x.astype(jnp.bfloat16) for x in (q2, k2, v2)]
    return {
        "bfloat16": (neighborhood_attention(*low, grid=(3, 4), kernel_size=(2, 3)),
                     neighborhood_attention(*(x.astype(jnp.float32) for x in low), grid=(3, 4), kernel_size=(2, 3),
                                            implementation="reference")),
        "full": (neighborhood_attention(q2, k2, v2, grid=(3, 4), kernel_size=(3, 4)),
                 attnx.dot_product_attention(q2, k2, v2, implementation="reference")),
        "k1": (neighborhood_attention(q2, k2, v2, grid=(3, 4), kernel_size=1), jnp.repeat(v2, N // K, axis=2)),
        "causal": (neighborhood_attention(q, k, v, causal=True, kernel_size=q.shape[1] + 3),
                   attnx.dot_product_attention(q, k, v, mask=attnx.Mask(causal=True), implementation="reference")),
    }


def test_limits_full_identity_and_causal():
    for name, (got, want) in small_cases(*inputs(13)).items():
        assert got.dtype == (jnp.bfloat16 if name == "bfloat16" else jnp.float32)
        assert_close(got, want, got.dtype, what=name)


def test_dilated_mask_is_undilated_mask_on_each_sub_grid():
    grid, kernel, dilation = (7, 8), (3, 2), (2, 3)
    coords = coordinates(grid)
    mask = na_mask(grid, kernel, dilation, (1, 1), (False, False))
    groups = [tuple(g) for g in np.ndindex(*dilation)]
    seen = np.zeros_like(mask)
    for group in groups:
        members = np.flatnonzero(np.all(coords % dilation == group, axis=1))  # row-major within the sub-grid too
        sub_grid = tuple(-(-(L - g) // d) for L, g, d in zip(grid, group, dilation))
        sub = na_mask(sub_grid, kernel, (1, 1), (1, 1), (False, False))
        assert np.array_equal(mask[np.ix_(members, members)], sub), group
        seen[np.ix_(members, members)] = True
    assert not mask[~seen].any()  # no key from another dilation group


def test_mask_is_symmetric_away_from_borders():
    grid, kernel = (9, 10), (3, 5)
    mask = na_mask(grid, kernel, (1, 1), (1, 1), (False, False))
    coords = coordinates(grid)
    radius = np.asarray(kernel) // 2
    interior = np.all((coords >= radius) & (coords < np.asarray(grid) - radius), axis=1)
    both = interior[:, None] & interior[None, :]
    assert np.array_equal(mask[both], mask.T[both])
    assert not np.array_equal(mask, mask.T)  # border windows shift inward: not symmetric there


def natten_v015_window(index, length, kernel, dilation):
    """NATTEN v0.15.1 natten_cpu_commons.h, get_window_start and get_pb_start (odd kernels), rewritten."""
    radius = kernel // 2
    if dilation <= 1:
        start = max(index - radius, 0) + (index + radius >= length) * (length - index - radius - 1)
        pb = radius + (index < radius) * (radius - index) + (index + radius >= length) * (length - index - 1 - radius)
        return start, pb
    if index - radius * dilation < 0:
        start = index % dilation
    elif index + radius * dilation >= length:
        imodd, a = index % dilation, (length // dilation) * dilation
        b = length - a
        start = length - b + imodd - 2 * radius * dilation if imodd < b else a + imodd - kernel * dilation
    else:
        start = index - radius * dilation
    if index - radius * dilation < 0:
        pb = kernel - 1 - index // dilation
    elif index + radius * dilation >= length:
        pb = (length - index - 1) // dilation
    else:
        pb = radius
    return start, pb


@pytest.mark.parametrize("kernel, dilation", [(3, 1), (5, 1), (3, 2), (5, 3), (7, 2)])
def test_windows_and_rpb_match_natten_v015(kernel, dilation):
    for length in range(kernel * dilation, kernel * dilation + 7):
        index, valid, rel = na_tables((length,), (kernel,), (dilation,), (1,), (False,))
        for i in range(length):
            start, pb = natten_v015_window(i, length, kernel, dilation)
            assert list(index[i]) == [start + t * dilation for t in range(kernel)], (length, i)
            assert list(rel[i]) == [pb + t for t in range(kernel)], (length, i)


def test_stride_equal_to_kernel_is_blocked_attention():
    grid, kernel = (6, 6), (3, 2)
    coords = coordinates(grid)
    same_block = np.all((coords[:, None] // kernel) == (coords[None] // kernel), axis=-1)
    assert np.array_equal(na_mask(grid, kernel, (1, 1), kernel, (False, False)), same_block)


def test_block_mask_covers_exactly_the_blocks_with_neighbours():
    grid, kernel = (8, 8), 3
    dense = na_mask(grid, (3, 3), (1, 1), (1, 1), (False, False))
    blocks = na_block_mask(grid, kernel, block_size=(16, 8))
    assert blocks.shape == (4, 8)
    expected = dense.reshape(4, 16, 8, 8).any(axis=(1, 3))
    assert np.array_equal(blocks, expected) and not blocks.all()


@jax.jit
def decode_case(q, k, v, rpb):
    options = dict(kernel_size=3, dilation=2)
    full = neighborhood_attention(q, k, v, causal=True, rpb=rpb, **options)
    positions = jnp.arange(q.shape[1] - 4, q.shape[1] - 1)  # later cache slots hold future keys: must be masked
    return full[:, positions], neighborhood_decode(q[:, positions], k, v, query_positions=positions, rpb=rpb, **options)


def test_tiles_skip_more_than_row_major_blocks_and_the_tile_block_mask_is_exact():
    """2-D NA, k = 7 on 64 x 64, 16-token blocks: a 16-token run of a row meets 7 rows of keys (6.8% of the block
    pairs kept), the chosen 4 x 4 tiles at most 3 x 3 tiles (3.2%). Where row-major runs are best (one whole row
    per block here) the search picks them. The per-axis block mask equals the permuted dense mask reduced per
    tile pair, and the permutation groups each tile."""
    from attnx.ops.local.tiled import default_tile, tile_permutation, tiled_block_mask

    na = ((7, 7), (1, 1), (1, 1), (False, False))
    tile = default_tile((64, 64), *na, tokens=16)
    assert tile == (4, 4)
    tiled = tiled_block_mask((64, 64), tile, *na)
    row_major = na_block_mask((64, 64), 7, block_size=(16, 16))
    assert tiled.mean() < 0.5 * row_major.mean() and tiled.sum(axis=1).max() == 9
    assert default_tile((64, 64), *na, tokens=64) == (1, 64)  # 7 of 64 blocks; 8 x 8 tiles would keep 9
    for grid, options, tile in [((6, 7), ((3, 3), (2, 1), (1, 3), (False, False)), (3, 1)),
                                ((3, 4, 5), ((2, 3, 2), (1, 1, 2), (1, 1, 1), (True, False, False)), (1, 2, 5))]:
        perm, inverse = tile_permutation(grid, tile)
        np.testing.assert_array_equal(perm[inverse], np.arange(len(perm)))
        dense = na_mask(grid, *options)[perm][:, perm]
        area = math.prod(tile)
        n = len(dense) // area
        np.testing.assert_array_equal(tiled_block_mask(grid, tile, *options),
                                      dense.reshape(n, area, n, area).any(axis=(1, 3)))
    first = coordinates((16, 16))[tile_permutation((16, 16), (4, 4))[0][:16]]  # rows 0-3 x columns 0-3
    assert first[:, 0].max() == 3 and first[:, 1].max() == 3


def test_decode_equals_last_rows_of_causal_forward():
    full, decoded = decode_case(*inputs(12), rpb_table((3,)))
    assert_close(decoded, full, jnp.float32)


@pytest.mark.parametrize("kwargs, message", [
    (dict(grid=(3, 3)), "class token"),
    (dict(grid=(2, 5), kernel_size=3), "kernel_size x dilation"),
    (dict(kernel_size=2, stride=3), "stride"),
    (dict(kernel_size=3, rpb=jnp.zeros((N, 3))), "rpb"),
    (dict(kernel_size=3, use_rpb=True), "use_rpb"),
    (dict(grid=(2, 5), kernel_size=1, causal=True, causal_axes=(True, False)), "causal_axes"),
    (dict(kernel_size=3, implementation="dense"), "implementation"),
    (dict(kernel_size=(3, 3)), "kernel_size"),
    (dict(kernel_size=3, tile=(2,)), "implementation='tiled' only"),
    (dict(kernel_size=3, implementation="tiled", tile=(4,)), "tile"),
    (dict(kernel_size=3, implementation="tiled", tiled_implementation="fast"), "tiled_implementation"),
])
def test_errors_name_the_argument(kwargs, message):
    q, k, v = inputs(10)
    with pytest.raises(ValueError, match=message):
        neighborhood_attention(q, k, v, **kwargs)


def test_cross_attention_is_refused():
    q, k, v = inputs(10)
    with pytest.raises(ValueError, match="self attention"):
        neighborhood_attention(q, k[:, :7], v[:, :7], kernel_size=3)


def _tiled_pallas(q, k, v, cotangent, **options):
    """Forward and input gradients of the tiled path over the Pallas GPU flash kernel (interpret mode on CPU)."""
    def loss(q, k, v):
        out = neighborhood_attention(q, k, v, implementation="tiled",
                                     tiled_implementation=attnx.PallasGpu(interpret=True), **options)
        return jnp.sum(out * cotangent), out

    return jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(q, k, v)


# Slow: the tiled path is tested over chunked, the kernel by its conformance suite.
@pytest.mark.slow
def test_tiled_path_over_the_pallas_gpu_kernel_equals_the_reference():
    """Issue 7's neighbourhood kernel: tokens in 4 x 4 tiles (16-token blocks) of an 8 x 8 grid through the
    block-skipping Pallas flash kernel with NATTEN's rule as an in-kernel mask_mod (interpret mode), forward and
    gradients. (RPB is a table gather, which the kernel refuses: tested on the chunked backend above.)"""
    options = dict(grid=(8, 8), kernel_size=3, dilation=(1, 2), tile=(4, 4))
    q, k, v = inputs(64)
    cotangent = jnp.asarray(np.random.default_rng(3).standard_normal((B, 64, N, V)), jnp.float32)
    (_, out), grads = jax.jit(lambda *a: _tiled_pallas(*a, **options))(q, k, v, cotangent)
    reference = lambda q, k, v: jnp.sum(neighborhood_attention(q, k, v, implementation="reference", **{
        n: o for n, o in options.items() if n != "tile"}) * cotangent)
    want, want_grads = jax.jit(jax.value_and_grad(reference, argnums=(0, 1, 2)))(q, k, v)
    assert_close(out, neighborhood_attention(q, k, v, implementation="reference", grid=(8, 8), kernel_size=3,
                                             dilation=(1, 2)), jnp.float32, what="tiled pallas forward")
    for name, got, expected in zip("qkv", grads, want_grads):
        assert_close(got, expected, jnp.float32, kind="gradient", what=f"tiled pallas d{name}")


def test_tiled_path_lowers_to_triton_for_cuda(monkeypatch):
    """The tiled rule's index arithmetic inside the kernels lowers to Triton IR (jax.export for CUDA on this CPU;
    jnp's floor division and remainder would not)."""
    from attnx.ops.softmax import pallas_gpu

    monkeypatch.setattr(pallas_gpu, "_backend", lambda: "gpu")
    shapes = [jax.ShapeDtypeStruct((1, 256, 4, 32), jnp.bfloat16)] * 3
    loss = lambda q, k, v: jnp.sum(neighborhood_attention(
        q, k, v, grid=(16, 16), kernel_size=5, implementation="tiled", tile=(4, 4),
        tiled_implementation=attnx.PallasGpu(interpret=False)).astype(jnp.float32))
    exported = jax.export.export(jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2))), platforms=["cuda"],
                                 disabled_checks=[jax.export.DisabledSafetyCheck.custom_call(
                                     "__gpu$xla.gpu.triton")])(*shapes)
    assert exported.mlir_module().count("xla.gpu.triton") == 3
