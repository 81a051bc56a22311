"""The Pallas GPU (Triton lowering) flash-attention kernel in interpret mode on CPU: the conformance suite, block
skipping, the explicit block-list API, ragged lengths and config validation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import attnx
import attnx.validation
from attnx.mask import Mask
from attnx.ops.softmax import block_list as bl
from attnx.ops.softmax import pallas_gpu
from attnx.testing.conformance import AttentionConformance
from attnx.testing.tolerances import assert_close

IMPL = attnx.PallasGpu(block_q=16, block_kv=16, interpret=True)


class TestPallasGpu(AttentionConformance):
    implementation = IMPL
    unsupported = frozenset()
    # Default share (the suite's time budget): causal + bias + ragged tile and segment ids; lengths, block lists
    # and skipping are covered by the module-level tests below (ragged multi-tile, never-read tiles, explicit
    # lists); every other case (block_mask, lengths, bf16, f16, sinks, mods, ...) runs with -m slow.
    default_cases = frozenset({"odd_lengths", "segment_ids"})

    # The eager half runs the interpreted kernel op by op (~10 CPU-s); determinism holds by construction (one
    # writer per output tile, no atomics), so this runs with -m slow.
    @pytest.mark.slow
    def test_deterministic_and_jit_equals_eager(self):
        super().test_deterministic_and_jit_equals_eager()

    # The CAB prefix property compiles one kernel per prefix length (9 compiles of ~1 s in interpret mode); the
    # chunked and reference backends run it in the default suite, so here it is slow.
    @pytest.mark.slow
    @pytest.mark.parametrize("pattern", ["CS", "CC"])
    def test_causal_prefix_property(self, pattern):
        super().test_causal_prefix_property(pattern)


def _inputs(B=2, T=40, S=36, N=4, K=2, H=8, V=8, dtype=jnp.float32, seed=0):
    rng = np.random.default_rng(seed)
    normal = lambda *shape: jnp.asarray(rng.standard_normal(shape), jnp.float32).astype(dtype)  # noqa: E731
    return normal(B, T, N, H), normal(B, S, K, H), normal(B, S, K, V)


def _fwd_and_grads(fn, q, k, v, *extra):
    """Output and gradients (w.r.t. every argument) of a fixed random projection of the output."""
    w = jnp.cos(jnp.arange(np.prod(q.shape[:-1]) * v.shape[-1], dtype=jnp.float32)).reshape(q.shape[:-1] + v.shape[-1:])
    loss = lambda *a: jnp.sum(fn(*a).astype(jnp.float32) * w)  # noqa: E731
    return fn(q, k, v, *extra), jax.grad(loss, argnums=tuple(range(3 + len(extra))))(q, k, v, *extra)


def _assert_matches(got, want, dtype=jnp.float32, what=""):
    (out, grads), (r_out, r_grads) = got, want
    assert_close(out, r_out, dtype, "forward", f"{what}: output")
    for n, (g, r) in enumerate(zip(grads, r_grads)):
        assert_close(g, r, dtype, "gradient", f"{what}: gradient {n}")


def test_ragged_multi_tile_lengths_with_gqa_window_bias_sinks():
    """Lengths that are no multiple of the tile (3 query and 3 key tiles, ragged last ones), GQA, a window with
    q_offset, segment ids, a broadcast bias, sinks, a soft cap and a value dim unlike H: forward and all gradients
    (q, k, v, bias, sinks) against the reference. JAX's own Pallas GPU kernel requires S % block == 0."""
    q, k, v = _inputs(T=40, S=36, V=12)
    seg_q = jnp.asarray(np.repeat([[0, 1, 2]], 2, 0).repeat([15, 15, 10], axis=1))
    seg_k = jnp.asarray(np.repeat([[0, 1, 2]], 2, 0).repeat([12, 14, 10], axis=1))
    mask = Mask(window=(9, 4), q_offset=-3, q_segment_ids=seg_q, kv_segment_ids=seg_k)
    bias = jnp.asarray(np.random.default_rng(1).standard_normal((1, 4, 1, 36)), jnp.float32)
    sinks = jnp.asarray([0.5, -1.0, 0.0, 2.0], jnp.float32)

    def make(impl):
        return jax.jit(lambda q, k, v, b, s: _fwd_and_grads(
            lambda q, k, v, b, s: attnx.dot_product_attention(
                q, k, v, b, mask, sinks=s, logits_soft_cap=2.5, implementation=impl), q, k, v, b, s))

    _assert_matches(make(IMPL)(q, k, v, bias, sinks), make("reference")(q, k, v, bias, sinks), what="ragged")


def test_vmap_of_forward_and_reverse_mode():
    """Forward mode is a custom_jvp whose tangent is a `linear_call` (attnx.ops.forward_mode); JAX has no batching
    rule for it, attnx registers one: vmap of jvp (batched tangents) and of grad (per-example gradients) through the
    kernel against the reference, causal GQA with ragged tiles."""
    q, k, v = _inputs(B=2, T=20, S=20, N=2, K=1, H=8, V=8)
    mask = Mask(causal=True)

    def per_example(impl):
        def attend(q, k, v):
            return attnx.dot_product_attention(q[None], k[None], v[None], mask=mask, implementation=impl)[0]

        def both(q, k, v):
            tangent = jax.jvp(attend, (q, k, v), (jnp.sin(q), jnp.cos(k), v))[1]
            grads = jax.grad(lambda *a: jnp.sum(attend(*a) ** 2), argnums=(0, 1, 2))(q, k, v)
            return tangent, grads
        return jax.jit(jax.vmap(both))

    got, want = per_example(IMPL)(q, k, v), per_example("reference")(q, k, v)
    for what, g, w in zip(("jvp", "dq", "dk", "dv"), jax.tree.leaves(got), jax.tree.leaves(want)):
        assert_close(g, w, jnp.float32, "gradient", f"vmap {what}")


def test_skipped_tiles_are_never_read():
    """Block skipping really skips: keys past kv_lengths fill whole tiles with NaN; a kernel that loaded them
    would return NaN (0 * NaN in P @ V). Output and gradients stay finite and match the reference."""
    q, k, v = _inputs(T=48, S=64, K=1)
    lens = jnp.array([16, 40])
    poison = (jnp.arange(64) >= 48)[None, :, None, None] | ((jnp.arange(2) == 0)[:, None, None, None]
                                                            & (jnp.arange(64) >= 16)[None, :, None, None])
    k_bad, v_bad = jnp.where(poison, jnp.nan, k), jnp.where(poison, jnp.nan, v)
    mask = Mask(kv_lengths=lens, causal=True)
    live = bl.live_blocks(mask, 48, 64, 16, 16)
    # b=0 reaches one key tile from every query tile; b=1 the causal band cut at 48 (tiles 0..2).
    np.testing.assert_array_equal(np.asarray(jnp.sum(live, axis=-1))[:, 0], [[1, 1, 1], [1, 2, 3]])
    out, grads = jax.jit(lambda q, k, v: _fwd_and_grads(
        lambda q, k, v: attnx.dot_product_attention(q, k, v, mask=mask, implementation=IMPL), q, k, v))(
            q, k_bad, v_bad)
    assert np.all(np.isfinite(np.asarray(out))) and all(np.all(np.isfinite(np.asarray(g)[:, :16])) for g in grads)
    ref = attnx.dot_product_attention(q, k, v, mask=mask, implementation="reference")
    assert_close(out, ref, jnp.float32, "forward", "poisoned skipped tiles")


def test_causal_block_counts():
    """The causal list visits the lower triangle of tiles only: nq·(nq+1)/2 of nq² at T = S."""
    live = bl.live_blocks(Mask(causal=True), 256, 256, 16, 16)
    ids, counts = bl.block_list_from_mask(live)
    assert int(jnp.sum(counts)) == 16 * 17 // 2 and live.size == 16 * 16
    np.testing.assert_array_equal(np.asarray(counts)[0, 0], np.arange(1, 17))
    np.testing.assert_array_equal(np.asarray(ids)[0, 0, 3, :4], [0, 1, 2, 3])
    # A causal sliding window of 32 keys: at most 3 tiles per query tile whatever the length.
    band = bl.live_blocks(Mask(causal=True, window=(31, 0)), 1024, 1024, 16, 16)
    assert int(jnp.max(jnp.sum(band, axis=-1))) == 3
    # Only the diagonal tiles need the element-wise mask; the lists put the 15·16/2 full tiles first.
    full = bl.full_blocks(Mask(causal=True), 256, 256, 16, 16)
    assert int(jnp.sum(full)) == 15 * 16 // 2
    row = np.asarray(bl.lists(live, full))[0, 0, 3]
    assert list(row[:6]) == [3, 4, 0, 1, 2, 3]
    # A ragged key tail (S = 250) and a length make the last key tiles partial, never full.
    lens = Mask(kv_lengths=jnp.array([100, 250]))
    full = np.asarray(bl.full_blocks(lens, 256, 250, 16, 16))
    assert full[0, 0, 0].tolist() == [True] * 6 + [False] * 10 and full[1, 0, 0].tolist() == [True] * 15 + [False]


# The non-causal list is the same kernel path without the diagonal test: slow, for the default time budget.
@pytest.mark.parametrize("causal", [pytest.param(False, marks=pytest.mark.slow), True])
def test_block_sparse_attention_matches_expanded_mask(causal):
    """`block_sparse_attention` over an explicit per-head list equals the reference under the expanded block mask,
    forward and gradients."""
    q, k, v = _inputs(T=40, S=48, N=2, K=1)
    live = jnp.asarray(np.random.default_rng(4).random((1, 2, 3, 3)) < 0.6).at[0, 1, 2].set(False)
    ids, counts = pallas_gpu.block_list_from_mask(live)
    mask = Mask(block_mask=live, block_size=(16, 16), causal=causal)
    got = jax.jit(lambda q, k, v: _fwd_and_grads(lambda q, k, v: pallas_gpu.block_sparse_attention(
        q, k, v, ids, counts, block_size=16, causal=causal, interpret=True), q, k, v))(q, k, v)
    want = jax.jit(lambda q, k, v: _fwd_and_grads(lambda q, k, v: attnx.dot_product_attention(
        q, k, v, mask=mask, implementation="reference"), q, k, v))(q, k, v)
    _assert_matches(got, want, what=f"block_sparse causal={causal}")


# slow: one more kernel compile (~5 CPU-s); the conformance block_mask case covers the unaligned path by default.
@pytest.mark.slow
def test_aligned_block_mask_stays_tile_level():
    """A block mask at (multiples of) the tile size is read at tile level only: no element-wise mask is
    materialised, and the output equals the reference's."""
    q, k, v = _inputs(T=40, S=48, N=2, K=1)
    live = jnp.asarray(np.random.default_rng(4).random((1, 2, 3, 3)) < 0.6).at[0, 1, 2].set(False)
    mask = Mask(block_mask=live, block_size=(16, 16), causal=True)
    meta, ops = pallas_gpu._prepare(attnx.validation.canonicalize(q, k, v, None, mask), IMPL)
    assert "dense" not in ops and meta.dense_dims is None
    out = jax.jit(lambda q, k, v: attnx.dot_product_attention(q, k, v, mask=mask, implementation=IMPL))(q, k, v)
    want = attnx.dot_product_attention(q, k, v, mask=mask, implementation="reference")
    assert_close(out, want, jnp.float32, "forward", "aligned block mask")


@pytest.mark.parametrize("kwargs, error", [
    (dict(block_q=24), ValueError), (dict(block_kv=8), ValueError), (dict(block_q=0), ValueError),
    (dict(num_warps=3), ValueError), (dict(num_stages=0), ValueError), (dict(block_q=True), ValueError),
    (dict(interpret="yes"), TypeError)])
def test_bad_config_raises(kwargs, error):
    with pytest.raises(error, match="PallasGpu"):
        attnx.PallasGpu(**kwargs)


def test_unsupported_arguments_raise_not_implemented():
    q, k, v = _inputs(T=4, S=4)
    with pytest.raises(NotImplementedError, match="score_mod closes over arrays"):
        # A learnable temperature: its gradient would need the kernel to differentiate w.r.t. closed-over arrays.
        jax.grad(lambda temp: attnx.dot_product_attention(
            q, k, v, score_mod=lambda s, b, n, t, j: s * temp, implementation=IMPL).sum())(1.0)
    table = jnp.arange(4.0)  # a concrete table: the kernel body cannot capture it
    with pytest.raises(NotImplementedError, match="mask_mod closes over arrays"):
        attnx.dot_product_attention(q, k, v, mask_mod=lambda b, n, t, j: table[t] >= 0, implementation=IMPL)
    big = jnp.zeros((1, 4, 2, 512))
    with pytest.raises(NotImplementedError, match="head dims"):
        attnx.dot_product_attention(big, big, big, implementation=IMPL)
    if jax.default_backend() != "gpu":
        with pytest.raises(NotImplementedError, match="needs a GPU"):
            attnx.dot_product_attention(q, k, v, implementation=attnx.PallasGpu(interpret=False))
        # In a list it falls through to the next implementation.
        out = attnx.dot_product_attention(q, k, v, implementation=[attnx.PallasGpu(interpret=False), "reference"])
        assert out.shape == (2, 4, 4, 8)


def test_block_sparse_attention_bad_list_shape():
    q, k, v = _inputs(T=40, S=48, N=2, K=1)
    ids, counts = bl.block_list_from_mask(jnp.ones((1, 2, 2, 3), bool))
    with pytest.raises(ValueError, match="block_ids"):
        pallas_gpu.block_sparse_attention(q, k, v, ids, counts, block_size=16, interpret=True)
    with pytest.raises(ValueError, match="block_size"):
        pallas_gpu.block_sparse_attention(q, k, v, ids, counts, block_size=24, interpret=True)


_LOWERING = {
    "causal_segments_lengths_bf16": dict(dtype=jnp.bfloat16, H=128, mask=lambda: Mask(
        causal=True, q_segment_ids=jnp.zeros((2, 300), jnp.int32), kv_segment_ids=jnp.zeros((2, 260), jnp.int32),
        kv_lengths=jnp.array([200, 260]), q_lengths=jnp.array([300, 17]))),
    "window_offset_bias_sinks_cap_f16": dict(dtype=jnp.float16, H=64, V=32, bias=(1, 8, 1, 260), sinks=True,
                                             cap=30.0, mask=lambda: Mask(window=(100, 20), q_offset=-40)),
    "dense_blockmask_mods_f32_h256": dict(dtype=jnp.float32, H=256, bias=(2, 1, 300, 260), mask=lambda: Mask(
        dense=jnp.ones((2, 8, 300, 260), bool), block_mask=jnp.ones((1, 8, 5, 9), bool), block_size=(64, 32)),
        score_mod=lambda s, b, n, t, j: s - 0.01 * (n + 1) * jnp.abs(t - j).astype(jnp.float32),
        mask_mod=lambda b, n, t, j: (t + j + n) % 7 != 0),
}


@pytest.mark.parametrize("name", sorted(_LOWERING))
def test_lowers_to_triton_for_cuda(name, monkeypatch):
    """Interpret mode does not check the Triton lowering's limits, so lower forward, backward and the forward-mode
    tangent for CUDA on this
    CPU (jax.export, no GPU needed): the Pallas -> Triton IR step must accept every kernel (power-of-two tiles,
    supported primitives, scalar list reads). Triton's own compilation to PTX still needs a GPU."""
    monkeypatch.setattr(pallas_gpu, "_backend", lambda: "gpu")
    c = _LOWERING[name]
    B, T, S, N, K, H, V = 2, 300, 260, 8, 2, c["H"], c.get("V", c["H"])
    dt = c["dtype"]
    impl = attnx.PallasGpu(interpret=False)
    shapes = [jax.ShapeDtypeStruct(s, dt) for s in ((B, T, N, H), (B, S, K, H), (B, S, K, V))]
    shapes.append(jax.ShapeDtypeStruct(c["bias"], dt) if "bias" in c else None)
    shapes.append(jax.ShapeDtypeStruct((N,), jnp.float32) if c.get("sinks") else None)

    def loss(q, k, v, bias, sinks):
        out, lse = attnx.dot_product_attention_with_lse(
            q, k, v, bias, c["mask"](), sinks=sinks, logits_soft_cap=c.get("cap"), score_mod=c.get("score_mod"),
            mask_mod=c.get("mask_mod"), implementation=impl)
        return jnp.sum(out.astype(jnp.float32)) + jnp.sum(jnp.where(jnp.isfinite(lse), lse, 0.0))

    argnums = tuple(n for n, s in enumerate(shapes) if s is not None)
    fn = jax.jit(jax.value_and_grad(loss, argnums=argnums))
    exported = jax.export.export(fn, platforms=["cuda"], disabled_checks=[
        jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")])(*shapes)
    # forward + dQ + dK/dV kernels
    assert exported.mlir_module().count("xla.gpu.triton") == 3
    # forward mode: forward + tangent kernels (the tangents' layout and the tangent kernel's body lower too)
    jvp = jax.jit(lambda *p: jax.jvp(loss, p, p))
    exported = jax.export.export(jvp, platforms=["cuda"], disabled_checks=[
        jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")])(*shapes)
    assert exported.mlir_module().count("xla.gpu.triton") == 2


def test_mask_mod_takes_part_in_skipping():
    """A block-diagonal mask_mod (tiles of 16) leaves one live, full tile per query tile; a stripe pattern leaves
    every tile live but none full."""
    live, full = bl.mask_mod_tables(lambda b, n, t, j: t // 16 == j // 16, 2, 3, 40, 48, 16, 16)
    assert live.shape == (2, 3, 3, 3)
    np.testing.assert_array_equal(np.asarray(live[1, 2]), np.eye(3, dtype=bool))
    np.testing.assert_array_equal(np.asarray(full[1, 2]), np.eye(3, dtype=bool))
    live, full = bl.mask_mod_tables(lambda b, n, t, j: (t + j + n) % 3 != 0, 1, 2, 40, 48, 16, 16)
    assert bool(jnp.all(live)) and not bool(jnp.any(full))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_compiled_on_gpu_matches_reference(dtype):
    """The Triton-compiled kernels (not the interpreter) on a GPU: ragged lengths, GQA, causal with segment ids and
    kv lengths, H=128; forward, gradients and the jvp against the float32 reference."""
    if jax.default_backend() != "gpu":
        pytest.skip("needs a GPU")
    q, k, v = _inputs(B=2, T=333, S=333, N=8, K=2, H=128, V=128, dtype=dtype)
    seg = jnp.asarray(np.repeat([[0, 1, 2]], 2, 0).repeat([100, 150, 83], axis=1))
    mask = Mask(causal=True, q_segment_ids=seg, kv_segment_ids=seg, kv_lengths=jnp.array([333, 250]))
    impl = attnx.PallasGpu(interpret=False)

    def make(impl, cast):
        def fn(q, k, v):
            return attnx.dot_product_attention(cast(q), cast(k), cast(v), mask=mask, implementation=impl)
        return jax.jit(lambda q, k, v: _fwd_and_grads(fn, q, k, v))

    f32 = lambda x: x.astype(jnp.float32)  # noqa: E731
    got = make(impl, lambda x: x)(q, k, v)
    want = make("reference", f32)(q, k, v)
    _assert_matches(got, want, dtype, what=f"compiled {jnp.dtype(dtype).name}")

    def tangent(impl, cast):  # forward mode: the tangent kernel
        attend = lambda q, k, v: attnx.dot_product_attention(  # noqa: E731
            cast(q), cast(k), cast(v), mask=mask, implementation=impl).astype(jnp.float32)
        return jax.jit(lambda q, k, v: jax.jvp(attend, (q, k, v), (jnp.sin(q), jnp.cos(k), v))[1])

    assert_close(tangent(impl, lambda x: x)(q, k, v), tangent("reference", f32)(q, k, v), dtype, "gradient",
                 f"compiled {jnp.dtype(dtype).name}: jvp")
