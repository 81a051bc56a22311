"""The Pallas TPU (Mosaic) flash-attention kernel in interpret mode on CPU: the conformance suite with 8 x 8 blocks
(ragged last blocks, several list steps, block skipping), its block lists, its Mosaic lowering at TPU block sizes,
and its configuration errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import attnx
from attnx.mask import Mask
from attnx.ops.softmax import pallas_tpu, pallas_tpu_blocks
from attnx.ops.softmax.pallas_tpu_blocks import static_tables
from attnx.testing.conformance import AttentionConformance
from attnx.testing.tolerances import assert_close
from attnx.validation import canonicalize

SMALL = attnx.PallasTpu(block_q=8, block_kv=8, interpret=True)


class TestPallasTpu(AttentionConformance):
    implementation = SMALL
    unsupported = frozenset()
    # Interpret mode is slow to compile on CPU (~4.5 CPU-s per forward + backward case with the reference): for
    # the suite's time budget the default share covers causal attention with ragged blocks and a bias (+ lse) and
    # causal segment ids (+ lse); MQA, GQA, windows, lengths, block masks and fully masked rows (lse -inf) are in
    # the module-level tests below. The other cases (block_mask, bf16, ...) are marked slow (run them with -m slow).
    default_cases = frozenset({"odd_lengths", "segment_ids"})

    @pytest.fixture(autouse=True)
    def _generic_interpreter(self, monkeypatch):
        # The generic interpreter checks the same numerics at a third of the CPU cost; the TPU memory semantics
        # (NaN-filled uninitialised buffers, out-of-bounds block reads) are checked by the module-level tests below,
        # which keep pltpu.InterpretParams.
        monkeypatch.setattr(pallas_tpu_blocks, "EMULATE_TPU", False)

    # Slow: two interpret-mode compiles (batched and vmapped); vmap of pallas_call is also exercised by nothing else.
    @pytest.mark.slow
    def test_vmap_matches_batch(self):
        super().test_vmap_matches_batch()

    # Slow: compiles the case twice more (jit and eager); determinism of the kernel is structural (no atomics).
    @pytest.mark.slow
    def test_deterministic_and_jit_equals_eager(self):
        super().test_deterministic_and_jit_equals_eager()

    # Slow: one compile per prefix length (9 in all); the CS/CC cases above already check the causal outputs.
    @pytest.mark.slow
    @pytest.mark.parametrize("pattern", ["CS", "CC"])
    def test_causal_prefix_property(self, pattern):
        super().test_causal_prefix_property(pattern)


def _qkv(B=2, T=13, S=11, N=4, K=2, H=16, dtype=jnp.float32, seed=0):
    rng = np.random.default_rng(seed)
    x = lambda *s: jnp.asarray(rng.standard_normal(s), jnp.float32).astype(dtype)
    return x(B, T, N, H), x(B, S, K, H), x(B, S, K, H)


def _out_and_grads(f, w, q, k, v):
    """f(q, k, v) and the gradients of sum(f * w), from one forward (one kernel compile, not two)."""
    loss = lambda q, k, v: (lambda out: (jnp.sum(out * w), out))(f(q, k, v))
    (_, out), grads = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(q, k, v)
    return out, grads


def _lists(mask, T, S, B=2, N=4, K=2, cfg=SMALL):
    q, k, v = _qkv(B, T, S, N, K, 8)
    lay, _, aux = pallas_tpu._layout_and_aux(canonicalize(q, k, v, None, mask), cfg, True)
    ents = np.asarray(aux["ents"]).reshape(lay.Bl, lay.Nl, lay.nq, lay.L)
    cnts = np.asarray(aux["cnts"]).reshape(lay.Bl, lay.Nl, lay.nq)
    return lay, ents, cnts, aux


def test_causal_lists_skip_blocks_above_the_diagonal():
    lay, ents, cnts, aux = _lists(Mask(causal=True), 32, 32)
    assert (lay.Bl, lay.Nl, lay.L, lay.Lt) == (1, 1, 4, 4)
    np.testing.assert_array_equal(cnts[0, 0], [1, 2, 3, 4])
    # Row i visits key blocks 0..i; only the diagonal block needs the element-wise mask (low bit of an entry).
    for i in range(4):
        got = ents[0, 0, i, : i + 1]
        np.testing.assert_array_equal(got >> 1, np.arange(i + 1))
        np.testing.assert_array_equal(got & 1, [0] * i + [1])
    # The transposed lists (dK/dV) of key block j hold query blocks j..3.
    np.testing.assert_array_equal(np.asarray(aux["cnts_t"]), [4, 3, 2, 1])


def test_window_and_lengths_shorten_the_lists_per_batch_element():
    lay, ents, cnts, _ = _lists(Mask(window=(8, 0), causal=True, kv_lengths=jnp.array([9, 32])), 32, 32)
    assert lay.L == 2 and lay.Bl == 2  # the static band is 2 blocks wide; lengths vary over the batch
    np.testing.assert_array_equal(cnts[:, 0], [[1, 2, 1, 0], [1, 2, 2, 2]])
    assert list(ents[0, 0, 1] >> 1) == [0, 1] and list(ents[1, 0, 3] >> 1) == [2, 3]


def test_segment_ids_and_block_masks_skip_blocks():
    seg = jnp.array([[0] * 16 + [1] * 16])
    _, _, cnts, _ = _lists(Mask(q_segment_ids=seg, kv_segment_ids=seg), 32, 32, B=1)
    np.testing.assert_array_equal(cnts[0, 0], [2, 2, 2, 2])
    bm = jnp.eye(4, dtype=bool)[None, None].repeat(4, axis=1).at[0, 1, 0, 3].set(True)
    lay, ents, cnts, _ = _lists(Mask(block_mask=bm, block_size=(8, 8)), 32, 32, B=1)
    assert lay.Nl == 4  # the block mask varies per head, so does the list
    np.testing.assert_array_equal(cnts[0, :, 0], [1, 2, 1, 1])
    assert list(ents[0, 1, 0, :2] >> 1) == [0, 3] and not np.any(ents[0, :, :, 0] & 1)


def test_skipped_blocks_are_not_read_under_tpu_emulation():
    """Under pltpu.InterpretParams (uninitialised buffers read as NaN, out-of-bounds block reads raise), with keys
    and values past kv_lengths set to NaN: any visited dead block would turn the output or a gradient into NaN
    (0 * NaN). Forward (with lse), dQ and dK/dV kernels, MQA, and a fully masked batch element (output 0, lse
    -inf, gradients 0)."""
    assert pallas_tpu_blocks.EMULATE_TPU
    q, k, v = _qkv(B=2, T=8, S=32, N=2, K=1)
    mask = Mask(kv_lengths=jnp.array([8, 0]))
    dead = jnp.arange(32)[None, :, None, None] >= jnp.array([8, 0])[:, None, None, None]
    k_nan, v_nan = jnp.where(dead, jnp.nan, k), jnp.where(dead, jnp.nan, v)
    w = jnp.cos(jnp.arange(16.0))

    def everything(impl, k, v):
        def loss(q, k, v):
            out, lse = attnx.dot_product_attention_with_lse(q, k, v, mask=mask, implementation=impl)
            return jnp.sum(out * w) + 0.3 * jnp.sum(jnp.where(jnp.isfinite(lse), lse, 0.0)), (out, lse)
        return jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(q, k, v)

    (_, (out, lse)), grads = jax.jit(lambda k, v: everything(SMALL, k, v))(k_nan, v_nan)
    (_, (r_out, r_lse)), r_grads = jax.jit(lambda k, v: everything("reference", k, v))(k, v)
    assert_close(out, r_out, jnp.float32, "forward", "output")
    assert np.all(np.asarray(out[1]) == 0) and np.all(np.asarray(lse[1]) == -np.inf)
    assert_close(lse[0], r_lse[0], jnp.float32, "forward", "lse")
    for name, g, r in zip("qkv", grads, r_grads):
        assert np.all(np.isfinite(np.asarray(g))), f"d{name}"
        assert_close(g, r, jnp.float32, "gradient", f"d{name}")


def test_ragged_window_gqa_and_nested_block_mask_match_reference(monkeypatch):
    """Blocks 16 x 8 that divide neither T nor S, a two-sided window with an offset, GQA, and a block mask whose
    blocks contain the kernel's (decided per block, no element mask): forward and gradients."""
    monkeypatch.setattr(pallas_tpu_blocks, "EMULATE_TPU", False)  # numerics only; memory semantics: next test
    q, k, v = _qkv(B=2, T=21, S=19, N=4, K=2)
    bm = jnp.asarray(np.random.default_rng(4).random((2, 1, 2, 2)) < 0.7).at[0, 0, 1, 1].set(True)
    mask = Mask(window=(6, 3), q_offset=2, block_mask=bm, block_size=(16, 16))
    cfg = attnx.PallasTpu(block_q=16, block_kv=8, interpret=True)
    w = jnp.cos(jnp.arange(16.0))

    def both(impl):
        return _out_and_grads(lambda q, k, v: attnx.dot_product_attention(q, k, v, mask=mask, implementation=impl),
                              w, q, k, v)

    out, grads = jax.jit(lambda: both(cfg))()
    r_out, r_grads = jax.jit(lambda: both("reference"))()
    assert_close(out, r_out, jnp.float32, "forward", "output")
    for name, g, r in zip("qkv", grads, r_grads):
        assert_close(g, r, jnp.float32, "gradient", f"d{name}")


def test_static_tables_mark_partial_blocks():
    live, full = static_tables(T=16, S=20, bq=8, bk=8, left=None, right=0, q_offset=0)
    np.testing.assert_array_equal(live, [[1, 0, 0], [1, 1, 0]])
    np.testing.assert_array_equal(full, [[0, 0, 0], [1, 0, 0]])  # diagonal blocks are partial


@pytest.mark.parametrize("dtype,masks", [("bfloat16", "segments"), ("float32", "dense")])
def test_lowers_to_mosaic_at_tpu_block_sizes(monkeypatch, dtype, masks):
    """The forward, dQ, dK/dV and tangent kernels pass Pallas's Mosaic lowering (block-shape rules, supported ops)
    for a TPU at 128 x 128 blocks, with ragged lengths, GQA, soft cap, sinks and either a causal window with segment
    ids, lengths and a full bias, or a dense int8 mask with a [1, N, 1, S] bias and a score_mod. Only the lowering
    runs: compiling for a TPU needs one."""
    monkeypatch.setattr(pallas_tpu, "_on_tpu", lambda: True)
    dt = jnp.dtype(dtype)
    B, T, S, N, K, H = 1, 300, 260, 4, 2, 64
    if masks == "segments":
        seg_q, seg_k = jnp.zeros((B, T), jnp.int32), jnp.zeros((B, S), jnp.int32)
        mask = Mask(causal=True, window=(100, 0), q_segment_ids=seg_q, kv_segment_ids=seg_k,
                    kv_lengths=jnp.array([200]))
        bias_shape = (B, N, T, S)
    else:
        mask = Mask(dense=jnp.asarray(np.random.default_rng(0).random((B, 1, T, S)) < 0.5))
        bias_shape = (1, N, 1, S)
    cfg = attnx.PallasTpu(interpret=False)

    def loss(q, k, v, bias):
        # With the dense mask also a score_mod (ALiBi-like distance penalty per head) traced into every kernel.
        mod = None if masks == "segments" else (
            lambda s, b, n, t, j: s - 0.01 * (n + 1) * jnp.abs(t - j).astype(jnp.float32))
        out, lse = attnx.dot_product_attention_with_lse(q, k, v, bias, mask, logits_soft_cap=3.0,
                                                       sinks=jnp.ones((N,)), score_mod=mod, implementation=cfg)
        return jnp.sum(out.astype(jnp.float32)) + jnp.sum(jnp.where(jnp.isfinite(lse), lse, 0.0))

    shapes = [jax.ShapeDtypeStruct(s, dt) for s in ((B, T, N, H), (B, S, K, H), (B, S, K, H), bias_shape)]
    lowered = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3))).trace(*shapes).lower(lowering_platforms=("tpu",))
    assert lowered.as_text().count("tpu_custom_call") == 3
    # forward mode: the forward and tangent kernels
    jvp = jax.jit(lambda *p: jax.jvp(loss, p, p))
    assert jvp.trace(*shapes).lower(lowering_platforms=("tpu",)).as_text().count("tpu_custom_call") == 2


def test_config_is_validated():
    for bad in (0, 12, -8):
        with pytest.raises(ValueError, match="PallasTpu.block_q"):
            attnx.PallasTpu(block_q=bad)
    with pytest.raises(TypeError, match="PallasTpu.interpret"):
        attnx.PallasTpu(interpret="yes")


def test_without_tpu_or_interpret_it_refuses_and_lists_fall_through(monkeypatch):
    monkeypatch.delenv("ATTNX_PALLAS_INTERPRET", raising=False)
    q, k, v = _qkv(T=6, S=6)
    with pytest.raises(NotImplementedError, match="needs a TPU"):
        attnx.dot_product_attention(q, k, v, implementation=attnx.PallasTpu())
    out = attnx.dot_product_attention(q, k, v, implementation=[attnx.PallasTpu(), "reference"])
    assert out.shape == q.shape[:3] + (16,)
    monkeypatch.setattr(pallas_tpu, "_on_tpu", lambda: True)
    with pytest.raises(ValueError, match="PallasTpu.block_kv: on a TPU expected a multiple of 128"):
        attnx.dot_product_attention(q, k, v, implementation=attnx.PallasTpu(block_kv=64, interpret=False))
    table = jnp.arange(6.0)  # a score_mod closing over an array (a kernel body cannot capture it): refused
    with pytest.raises(NotImplementedError, match="pallas_tpu: score_mod closes over arrays"):
        attnx.dot_product_attention(q, k, v, score_mod=lambda s, b, n, t, j: s + table[t], implementation=SMALL)
    with pytest.raises(NotImplementedError, match="pallas_tpu: score_mod closes over arrays"):
        jax.grad(lambda temp: attnx.dot_product_attention(  # a traced one: its gradient would be lost
            q, k, v, score_mod=lambda s, b, n, t, j: s * temp, implementation=SMALL).sum())(1.0)
