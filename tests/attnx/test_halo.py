"""HaloNet attention (spec vision_mechanisms.md §4 (e)): blocked path == dense reference (forward and gradients on a
2-D grid with rectangular blocks, GQA and relative embeddings; forward for 1-D and bfloat16); mask_padding=True ==
dense masked attention over the unpadded map with an explicit r[delta] bias; h = 0 is window attention; one block
with h = 0 is full attention; parity with a numpy port of timm's HaloAttn core (zero-padded unfold, rel_logits_1d's
pad-and-reshape indexing); errors."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import attnx
from attnx.ops.local.halo import halo_attention
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
}


@pytest.mark.parametrize("case", CASES, ids=list(CASES))
def test_blocked_equals_dense_reference(case):
    options = CASES[case]
    grid = options["grid"]
    rank = len(grid)
    block, halo = (options[name] if isinstance(options[name], tuple) else (options[name],) * rank
                   for name in ("block_size", "halo_size"))
    q, k, v = inputs(math.prod(grid))
    cotangent = jnp.asarray(np.random.default_rng(2).standard_normal((B, math.prod(grid), N, V)), jnp.float32)
    results = both_paths(q, k, v, tables(block, halo), cotangent, tuple(sorted(options.items())))
    ((_, out), grads), ((_, want), want_grads) = results["blocked"], results["reference"]
    assert_close(out, want, jnp.float32, what=f"{case} forward")
    for name, got, expected in zip(("query", "key", "value", "rel"), grads, want_grads):
        for g, e in zip(jax.tree.leaves(got), jax.tree.leaves(expected)):
            assert_close(g, e, jnp.float32, kind="gradient", what=f"{case} d{name}")


def dense_halo_oracle(q, k, v, rel, grid, block, halo):
    """Masked attention over the unpadded map: key inside the query block's halo window, bias q.r[key - query +
    h + w - 1] per axis (timm's table row), written from coordinates."""
    c = coordinates(grid)
    origin = c // np.asarray(block) * np.asarray(block)
    rel_offset = c[None] - origin[:, None]
    allowed = np.all((rel_offset >= -np.asarray(halo)) & (rel_offset < np.asarray(block) + np.asarray(halo)), -1)
    bias = 0.0
    for a, (b, h) in enumerate(zip(block, halo)):
        rows = np.clip(c[None, :, a] - c[:, a][:, None] + h + (b + 2 * h) - 1, 0, 2 * (b + 2 * h) - 2)
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


def timm_halo(q, k, v, rel_h, rel_w, grid, block, halo):
    """timm HaloAttn.forward after its projections (one head per q/k/v head, no GQA), in numpy: zero-pad k and v,
    unfold (b + 2h)^2 windows at stride b, logits scale q.k + relative logits, softmax over the window."""
    Bq, T, heads, d = q.shape
    window = block + 2 * halo
    img = lambda x: x.reshape(Bq, *grid, heads, -1)
    q, k, v = img(q), img(k), img(v)
    pad = [(0, 0), (halo, halo), (halo, halo), (0, 0), (0, 0)]
    k, v = np.pad(k, pad), np.pad(v, pad)
    out = np.zeros((Bq, *grid, heads, v.shape[-1]))
    for by in range(grid[0] // block):
        for bx in range(grid[1] // block):
            qb = q[:, by * block:(by + 1) * block, bx * block:(bx + 1) * block]  # [B, b, b, n, d]
            kw = k[:, by * block:by * block + window, bx * block:bx * block + window]
            vw = v[:, by * block:by * block + window, bx * block:bx * block + window]
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
    return out.reshape(Bq, T, heads, -1)


def test_matches_timm_port_with_unmasked_zero_padding():
    grid, block, halo = (4, 4), 2, 1
    q, k, v = inputs(16, seed=4, kv_heads=N)
    rel_h, rel_w = tables((block, block), (halo, halo), seed=5)
    got = jax.jit(lambda *a: halo_attention(*a, grid=grid, block_size=block, halo_size=halo, rel=(rel_h, rel_w)))(
        q, k, v)
    want = timm_halo(*(np.asarray(x, np.float64) for x in (q, k, v, rel_h, rel_w)), grid, block, halo)
    assert_close(got, want, jnp.float32)


@pytest.mark.parametrize("kwargs, message", [
    (dict(grid=(3, 3)), "class token"),
    (dict(grid=(2, 5), block_size=2), "multiple of the block"),
    (dict(grid=(2, 5), block_size=(2, 5), halo_size=1, rel=(jnp.zeros((7, H)),)), "rel"),
    (dict(causal=True), "non-causal"),
    (dict(implementation="dense"), "implementation"),
    (dict(block_size=0), "block_size"),
])
def test_errors_name_the_argument(kwargs, message):
    q, k, v = inputs(10)
    with pytest.raises(ValueError, match=message):
        halo_attention(q, k, v, **{"block_size": 2, "halo_size": 1, **kwargs})


def test_cross_attention_is_refused():
    q, k, v = inputs(10)
    with pytest.raises(ValueError, match="self attention"):
        halo_attention(q, k[:, :6], v[:, :6], block_size=2, halo_size=1)
