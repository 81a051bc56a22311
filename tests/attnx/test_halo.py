"""HaloNet attention (spec vision_mechanisms.md §4 (e)): blocked path == dense reference (forward and gradients on a
2-D grid with rectangular blocks, GQA and relative embeddings; forward for 1-D and bfloat16); mask_padding=True ==
dense masked attention over the unpadded map with an explicit r[delta] bias; h = 0 is window attention; one block
with h = 0 is full attention; parity with a numpy port of timm's HaloAttn core (zero-padded unfold, rel_logits_1d's
pad-and-reshape indexing); the stride-2 variant (strided queries: blocked == reference in forward and gradients,
== the dense masked oracle, == the timm port with its strided query convolution; avg_down == numpy pooling);
errors."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import attnx
from attnx.ops.local.halo import avg_down, halo_attention, strided_queries
from attnx.ops.local.tables import coordinates
from attnx.testing.tolerances import assert_close

B, N, K, H, V = 2, 4, 2, 8, 6


def inputs(T, seed=0, kv_heads=K):
    rng = np.random.default_rng(seed)
    q, k = rng.standard_normal((B, T, N, H)), rng.standard_normal((B, T, kv_heads, H))
    v = rng.standard_normal((B, T, kv_heads, V))
    return tuple(jnp.asarray(x, jnp.float32) for x in (q, k, v))


def tables(block, halo, seed=1):
    rng = np.random.default_rng(seed)
    return tuple(jnp.asarray(rng.standard_normal((2 * (b + 2 * h) - 1, H)), jnp.float32) for b, h in zip(block, halo))


@functools.partial(jax.jit, static_argnames=("options",))
def both_paths(q, k, v, rel, cotangent, options):
    options = dict(options)

    def loss(impl, q, k, v, rel):
        out = halo_attention(q, k, v, rel=rel, implementation=impl, **options)
        return jnp.sum(out * cotangent), out

    return {impl: jax.value_and_grad(functools.partial(loss, impl), argnums=(0, 1, 2, 3), has_aux=True)(q, k, v, rel)
            for impl in ("blocked", "reference")}


# One compiled gradient case (compiles dominate the run time); masked padding and 1-D are checked forward below.
CASES = {
    "2d-rect-timm-padding": dict(grid=(4, 6), block_size=(2, 3), halo_size=(1, 2)),
    # timm's stride-2 variant: 2x3 queries (every other pixel) in 1x1 subsampled blocks of 2x2 blocks
    "2d-stride-2": dict(grid=(4, 6), block_size=2, halo_size=(1, 2), stride=2),
}


@pytest.mark.parametrize("case", CASES, ids=list(CASES))
def test_blocked_equals_dense_reference(case):
    options = CASES[case]
    grid = options["grid"]
    rank = len(grid)
    block, halo = (options[name] if isinstance(options[name], tuple) else (options[name],) * rank
                   for name in ("block_size", "halo_size"))
    q, k, v = inputs(math.prod(grid))
    stride = options.get("stride", 1)
    q = strided_queries(q, grid, stride)
    cotangent = jnp.asarray(np.random.default_rng(2).standard_normal((*q.shape[:3], V)), jnp.float32)
    results = both_paths(q, k, v, tables(block, halo), cotangent, tuple(sorted(options.items())))
    ((_, out), grads), ((_, want), want_grads) = results["blocked"], results["reference"]
    assert_close(out, want, jnp.float32, what=f"{case} forward")
    for name, got, expected in zip(("query", "key", "value", "rel"), grads, want_grads):
        for g, e in zip(jax.tree.leaves(got), jax.tree.leaves(expected)):
            assert_close(g, e, jnp.float32, kind="gradient", what=f"{case} d{name}")


def dense_halo_oracle(q, k, v, rel, grid, block, halo, stride=1):
    """Masked attention over the unpadded map: key inside the query block's halo window, bias q.r[key - query +
    h + w - 1] per axis (timm's table row), written from coordinates. With a stride s the queries are the pixels
    s * (subsampled coordinate) and the row is (key - origin + h) - (query - origin) / s + w - 1 (timm indexes the
    query inside its subsampled block)."""
    c = coordinates(grid)
    qc = coordinates(tuple(L // stride for L in grid)) * stride
    origin = qc // np.asarray(block) * np.asarray(block)
    rel_offset = c[None] - origin[:, None]
    allowed = np.all((rel_offset >= -np.asarray(halo)) & (rel_offset < np.asarray(block) + np.asarray(halo)), -1)
    bias = 0.0
    for a, (b, h) in enumerate(zip(block, halo)):
        row = c[None, :, a] - origin[:, None, a] + h - (qc[:, a] - origin[:, a])[:, None] // stride + b + 2 * h - 1
        rows = np.clip(row, 0, 2 * (b + 2 * h) - 2)
        gathered = rel[a][rows]  # [T, S, H]
        bias = bias + jnp.einsum("btnh,tsh->bnts", q, gathered, precision="highest")
    mask = attnx.Mask(dense=jnp.asarray(allowed))
    return attnx.dot_product_attention(q, k, v, bias, mask, implementation="reference")


@jax.jit
def limit_cases(q, k, v, rel, rel_1d):
    grid, block, halo = (4, 6), (2, 3), (1, 1)
    same_block = np.all(coordinates(grid)[:, None] // block == coordinates(grid)[None] // block, -1)
    one_d = dict(block_size=4, halo_size=2, rel=rel_1d)
    low = [x.astype(jnp.bfloat16) for x in (q, k, v)]
    return {
        "bfloat16": (halo_attention(*low, grid=grid, block_size=block, halo_size=halo, rel=rel),
                     halo_attention(*(x.astype(jnp.float32) for x in low), grid=grid, block_size=block,
                                    halo_size=halo, rel=rel, implementation="reference")),
        "1-D": (halo_attention(q, k, v, **one_d), halo_attention(q, k, v, implementation="reference", **one_d)),
        "masked == dense": (halo_attention(q, k, v, grid=grid, block_size=block, halo_size=halo, rel=rel,
                                           mask_padding=True),
                            dense_halo_oracle(q, k, v, rel, grid, block, halo)),
        "h=0 is windows": (halo_attention(q, k, v, grid=grid, block_size=block, halo_size=0),
                           attnx.dot_product_attention(q, k, v, mask=attnx.Mask(dense=jnp.asarray(same_block)),
                                                       implementation="reference")),
        "one block is full": (halo_attention(q, k, v, grid=grid, block_size=grid, halo_size=0),
                              attnx.dot_product_attention(q, k, v, implementation="reference")),
        "stride 2 masked == dense": (halo_attention(strided_queries(q, grid), k, v, grid=grid, block_size=2,
                                                    halo_size=halo, rel=tables((2, 2), halo, seed=6), stride=2,
                                                    mask_padding=True),
                                     dense_halo_oracle(strided_queries(q, grid), k, v, tables((2, 2), halo, seed=6),
                                                       grid, (2, 2), halo, stride=2)),
    }


def test_masked_windows_and_full_limits():
    q, k, v = inputs(24, seed=3)
    for name, (got, want) in limit_cases(q, k, v, tables((2, 3), (1, 1)), tables((4,), (2,))).items():
        assert got.dtype == (jnp.bfloat16 if name == "bfloat16" else jnp.float32)
        assert_close(got, want, got.dtype, what=name)


def rel_logits_1d_timm(q, rel):
    """timm's rel_logits_1d as a numpy port: q [M, rows, cols, d], rel [2w - 1, d] -> [M, rows, cols, w] through the
    pad / flatten / pad / reshape / slice relative-to-absolute trick (the indexing under test)."""
    M, rows, cols, _ = q.shape
    size = rel.shape[0]
    window = (size + 1) // 2
    x = (q @ rel.T).reshape(-1, cols, size)
    x = np.pad(x, [(0, 0), (0, 0), (0, 1)]).reshape(len(x), -1)
    x = np.pad(x, [(0, 0), (0, size - cols)]).reshape(-1, cols + 1, size)
    return x[:, :cols, window - 1:].reshape(M, rows, cols, window)


def timm_halo(q, k, v, rel_h, rel_w, grid, block, halo, stride=1):
    """timm HaloAttn.forward after its projections (one head per q/k/v head, no GQA), in numpy: zero-pad k and v,
    unfold (b + 2h)^2 windows at stride b, logits scale q.k + relative logits, softmax over the window. stride:
    the query projection's stride (the queries are q[::s, ::s]), blocks of b / s queries."""
    Bq, T, heads, d = q.shape
    window = block + 2 * halo
    img = lambda x: x.reshape(Bq, *grid, heads, -1)
    q, k, v = img(q)[:, ::stride, ::stride], img(k), img(v)
    full, block = block, block // stride
    pad = [(0, 0), (halo, halo), (halo, halo), (0, 0), (0, 0)]
    k, v = np.pad(k, pad), np.pad(v, pad)
    out = np.zeros((Bq, grid[0] // stride, grid[1] // stride, heads, v.shape[-1]))
    for by in range(grid[0] // full):
        for bx in range(grid[1] // full):
            qb = q[:, by * block:(by + 1) * block, bx * block:(bx + 1) * block]  # [B, b, b, n, d]
            kw = k[:, by * full:by * full + window, bx * full:bx * full + window]
            vw = v[:, by * full:by * full + window, bx * full:bx * full + window]
            logits = np.einsum("byxnd,bijnd->bnyxij", qb, kw) * d**-0.5
            qm = np.moveaxis(qb, 3, 1).reshape(-1, block, block, d)  # [B n, y, x, d]
            width = rel_logits_1d_timm(qm, rel_w).reshape(Bq, heads, block, block, 1, window)
            height = rel_logits_1d_timm(qm.transpose(0, 2, 1, 3), rel_h).transpose(0, 2, 1, 3)
            logits = logits + width + height.reshape(Bq, heads, block, block, window, 1)
            logits = logits.reshape(*logits.shape[:4], -1)
            probs = np.exp(logits - logits.max(-1, keepdims=True))
            probs /= probs.sum(-1, keepdims=True)
            out[:, by * block:(by + 1) * block, bx * block:(bx + 1) * block] = np.einsum(
                "bnyxw,bwnv->byxnv", probs, vw.reshape(Bq, window * window, heads, -1))
    return out.reshape(Bq, -1, heads, out.shape[-1])


@jax.jit
def _timm_cases(q, k, v, rel_h, rel_w, rel4_h, rel4_w):
    plain = halo_attention(q, k, v, grid=(4, 4), block_size=2, halo_size=1, rel=(rel_h, rel_w))
    strided = halo_attention(strided_queries(q, (4, 4)), k, v, grid=(4, 4), block_size=4, halo_size=1,
                             rel=(rel4_h, rel4_w), stride=2)
    return plain, strided, avg_down(plain, (4, 4))


def test_matches_timm_port_with_unmasked_zero_padding_and_stride_2():
    grid, halo = (4, 4), 1
    q, k, v = inputs(16, seed=4, kv_heads=N)
    rel_h, rel_w = tables((2, 2), (halo, halo), seed=5)
    rel4_h, rel4_w = tables((4, 4), (halo, halo), seed=7)
    plain, strided, pooled = _timm_cases(q, k, v, rel_h, rel_w, rel4_h, rel4_w)
    q64, k64, v64 = (np.asarray(x, np.float64) for x in (q, k, v))
    want = timm_halo(q64, k64, v64, np.asarray(rel_h), np.asarray(rel_w), grid, 2, halo)
    assert_close(plain, want, jnp.float32)
    # block 4 with stride 2: 2x2 subsampled queries per 4x4 block, its 6x6 window, timm's rel_logits_1d on 2 rows
    want = timm_halo(q64, k64, v64, np.asarray(rel4_h), np.asarray(rel4_w), grid, 4, halo, stride=2)
    assert strided.shape == (B, 4, N, V)
    assert_close(strided, want, jnp.float32)
    # avg_down: nn.AvgPool2d(2, 2) of the stride-1 output
    image = np.asarray(plain, np.float64).reshape(B, 2, 2, 2, 2, N, V)
    assert_close(pooled, image.mean(axis=(2, 4)).reshape(B, 4, N, V), jnp.float32)


@pytest.mark.parametrize("kwargs, message", [
    (dict(grid=(3, 3)), "class token"),
    (dict(grid=(2, 5), block_size=2), "multiple of the block"),
    (dict(grid=(2, 5), block_size=(2, 5), halo_size=1, rel=(jnp.zeros((7, H)),)), "rel"),
    (dict(causal=True), "non-causal"),
    (dict(implementation="dense"), "implementation"),
    (dict(block_size=0), "block_size"),
    (dict(grid=(2, 5), block_size=(2, 5), stride=2), "avg_down"),
    (dict(grid=(2, 5), block_size=(2, 5), stride=(2, 5)), "subsampled"),
])
def test_errors_name_the_argument(kwargs, message):
    q, k, v = inputs(10)
    with pytest.raises(ValueError, match=message):
        halo_attention(q, k, v, **{"block_size": 2, "halo_size": 1, **kwargs})


def test_cross_attention_is_refused():
    q, k, v = inputs(10)
    with pytest.raises(ValueError, match="self attention"):
        halo_attention(q, k[:, :6], v[:, :6], block_size=2, halo_size=1)
