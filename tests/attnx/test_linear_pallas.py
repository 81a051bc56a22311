"""The Lightning Attention-2 Pallas scans (attnx/ops/linear/pallas_gpu.py, Triton; pallas_tpu.py, Mosaic) in
interpret mode: forward, gradients (query, key, value and the decay slopes) and jvp against the quadratic reference,
with and without decay, GQA/MQA, ragged lengths, several value tiles, float32 and bfloat16, vmap; the kernels' IR built
for CUDA and TPU on CPU; the dispatch of `lightning_attention` and `based_attention`; errors that name the argument.
Interpret-mode compiles dominate the cost, so every compiled function is module-level and each returns the output
and all gradients at once (one compile per configuration)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnx.ops.linear.based import based_attention
from attnx.ops.linear.decay import alibi_slopes
from attnx.ops.linear.lightning import lightning_attention
from attnx.ops.linear.pallas_gpu import LinearScanPallas, lightning_pallas
from attnx.ops.linear.pallas_tpu import LinearScanPallasTpu, lightning_pallas_tpu
from attnx.ops.linear.reference import lightning_reference
from attnx.testing.tolerances import assert_close

# T=37 is ragged against block 16 (3 blocks, 11 padded rows); V=32 with block_v=16 gives two value tiles, so the
# float32 partial sums of dQ and dK over tiles are exercised; N=4 query heads over K=2 kv heads (GQA).
B, T, N, K, H, V = 2, 37, 4, 2, 16, 32
BLOCK, BLOCK_V = 16, 16


def inputs(dtype=jnp.float32, kv_heads=K, seed=0):
    kq, kk, kv, kc = jax.random.split(jax.random.key(seed), 4)
    q = jax.random.normal(kq, (B, T, N, H)) * H**-0.5
    k = jax.random.normal(kk, (B, T, kv_heads, H))
    v = jax.random.normal(kv, (B, T, kv_heads, V))
    cotangent = jax.random.normal(kc, (B, T, N, V))
    return q.astype(dtype), k.astype(dtype), v.astype(dtype), cotangent.astype(dtype)


def _value_and_grads(fn, q, k, v, s, cotangent):
    out, vjp = jax.vjp(fn, q, k, v, s)
    return out, vjp(cotangent)


@functools.partial(jax.jit, static_argnames="decay")
def kernel_and_grads(q, k, v, s, cotangent, decay=True):
    fn = lambda q, k, v, s: lightning_pallas(q, k, v, s if decay else None, block_size=BLOCK, block_v=BLOCK_V,
                                             interpret=True)
    return _value_and_grads(fn, q, k, v, s, cotangent)


@jax.jit
def reference_and_grads(q, k, v, s, cotangent):
    """The float32 oracle on inputs upcast from the tested dtype (attnx/testing/tolerances.py)."""
    upcast = [x.astype(jnp.float32) for x in (q, k, v, cotangent)]
    return _value_and_grads(lightning_reference, *upcast[:3], s, upcast[3])


def check(got, want, dtype, decay=True):
    (out, grads), (out_ref, grads_ref) = got, want
    assert out.dtype == dtype and out.shape == out_ref.shape
    assert_close(out, out_ref, dtype, what="output")
    names = ("query", "key", "value", "slopes") if decay else ("query", "key", "value")
    for name, g, w in zip(names, grads, grads_ref):
        assert g.shape == w.shape, name
        assert_close(g, w, dtype, "gradient", what=name)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["float32", "bfloat16"])
def test_decayed_scan_and_gradients_match_the_reference(dtype):
    q, k, v, cotangent = inputs(dtype)
    s = jnp.asarray(alibi_slopes(N))
    check(kernel_and_grads(q, k, v, s, cotangent), reference_and_grads(q, k, v, s, cotangent), dtype)


def test_constant_slopes_skip_their_gradient():
    """Slopes that are not differentiated (symbolic zeros, attnx.ops.forward_mode) take the cheaper backward without
    the dL/ds terms; dQ, dK, dV are unchanged."""
    q, k, v, cotangent = inputs(seed=11)
    s = jnp.asarray(alibi_slopes(N))
    fn = lambda q, k, v: lightning_pallas(q, k, v, s, block_size=BLOCK, block_v=BLOCK_V, interpret=True)
    got = jax.jit(lambda q, k, v: jax.vjp(fn, q, k, v)[1](cotangent))(q, k, v)
    want = reference_and_grads(q, k, v, s, cotangent)[1]
    for name, g, w in zip(("query", "key", "value"), got, want):
        assert_close(g, w, jnp.float32, "gradient", what=name)


def test_no_decay_is_plain_causal_linear_attention_mqa():
    q, k, v, cotangent = inputs(kv_heads=1, seed=1)  # MQA: all four query heads share one kv head
    zeros = jnp.zeros((N,), jnp.float32)
    got = kernel_and_grads(q, k, v, zeros, cotangent, decay=False)
    check(got, reference_and_grads(q, k, v, zeros, cotangent), jnp.float32, decay=False)
    assert got[1][3] is None or not np.any(np.asarray(got[1][3]))  # slopes=None: nothing flows to them


def _long_sequence(seed=9, T_long=2048):
    rng = np.random.default_rng(seed)
    normal = lambda *shape: jnp.asarray(rng.standard_normal(shape), jnp.float32)
    q, k, v, cotangent = normal(1, T_long, 2, 16) * 0.25, normal(1, T_long, 2, 16), normal(1, T_long, 2, 16), \
        normal(1, T_long, 2, 16)
    return q, k, v, cotangent, jnp.asarray([0.5, 0.01], jnp.float32)  # a fast and a slow decay


def test_slope_gradient_keeps_float32_accuracy_on_long_sequences():
    """T=2048 in 32 blocks: the kernel's blockwise slope gradient matches the reference in float32. (The closed form
    sum_j j (k_j . dK_j) - sum_t t (q_t . dQ_t) that it replaced cancels: 1.5e-4 relative error at T=4096, s=0.5.)"""
    q, k, v, cotangent, s = _long_sequence()
    got = jax.jit(lambda *a: _value_and_grads(lambda q, k, v, s: lightning_pallas(q, k, v, s, interpret=True), *a))(
        q, k, v, s, cotangent)
    check(got, reference_and_grads(q, k, v, s, cotangent), jnp.float32)


def test_lightning_attention_dispatches_to_the_kernel_both_directions():
    """implementation=LinearScanPallas(...) runs the kernel; causal=False is a forward and a flipped scan."""
    q, k, v, _ = inputs(seed=2)
    config = LinearScanPallas(block_size=BLOCK, block_v=BLOCK_V, interpret=True)
    got = jax.jit(lambda q, k, v: lightning_attention(q, k, v, causal=False, implementation=config))(q, k, v)
    assert_close(got, lightning_attention(q, k, v, causal=False, implementation="reference"), jnp.float32)


def test_based_runs_its_taylor_features_through_the_scan():
    """Based (Taylor features, 1 + d + d^2 = 21 for d = 4, padded to 32 in the kernel; the normaliser is an extra
    value column) against Based's quadratic reference, forward and gradients; also exercises the no-decay backward
    with a non-power-of-two feature width."""
    d = 4
    q, k, v, cotangent = (x[..., :d] if i < 2 else x for i, x in enumerate(inputs(seed=3)))
    q = q * 0.5  # keep the Taylor kernel moderate so the normaliser is well conditioned
    config = LinearScanPallas(block_size=BLOCK, block_v=BLOCK_V, interpret=True)

    def value_and_grads(implementation):
        fn = lambda q, k, v: based_attention(q, k, v, causal=True, implementation=implementation)
        out, vjp = jax.vjp(fn, q, k, v)
        return out, vjp(cotangent)

    got = jax.jit(lambda: value_and_grads(config))()
    want = value_and_grads("reference")
    assert_close(got[0], want[0], jnp.float32, what="based output")
    for name, g, w in zip(("query", "key", "value"), got[1], want[1]):
        assert_close(g, w, jnp.float32, "gradient", what=f"based {name}")


@pytest.mark.parametrize("dtype, decay", [(jnp.bfloat16, True), (jnp.float32, False)], ids=["bf16-decay", "f32"])
def test_triton_lowering_for_cuda(monkeypatch, dtype, decay):
    """Builds the Triton IR of the forward, dQ and dK/dV kernels for CUDA without a GPU, at the benchmark's head dim
    128 with a ragged length and GQA: interpret mode does not check Triton's limits (power-of-two tiles, supported
    primitives, scalar loads); this does (the PTX compile itself still needs a GPU)."""
    from jax import export

    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")  # the entry refuses CPU unless interpreting
    spec = lambda *shape: jax.ShapeDtypeStruct(shape, dtype)
    s = jnp.asarray(alibi_slopes(4)) if decay else None

    def grad_fn(q, k, v):
        f = lambda q, k, v: lightning_pallas(q, k, v, s, interpret=False)
        out, vjp = jax.vjp(f, q, k, v)
        return out, vjp(out)

    exported = export.export(jax.jit(grad_fn), platforms=["cuda"], disabled_checks=[
        export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")])(
        spec(1, 200, 4, 128), spec(1, 200, 2, 128), spec(1, 200, 2, 128))
    assert exported.mlir_module().count("__gpu$xla.gpu.triton") == 3  # forward, dQ, dK/dV


def test_vmap_over_a_leading_axis():
    """jax.vmap adds a grid axis through pallas_call's batching rule (ARCHITECTURE §1: every attnx function vmaps)."""
    q, k, v, _ = inputs(seed=8)
    s = jnp.asarray(alibi_slopes(N))
    stack = lambda x: jnp.stack([x[:1], x[1:]])  # [2, 1, T, ., .]
    got = jax.vmap(lambda q, k, v: lightning_pallas(q, k, v, s, block_size=BLOCK, interpret=True))(
        stack(q), stack(k), stack(v))
    assert_close(got.reshape(B, T, N, V), lightning_reference(q, k, v, s), jnp.float32, what="vmap")


def test_value_tile_rule():
    """block_v=None: 64 columns when the grid is large, halved down to 16 while B * N * tiles < 256 programs."""
    from attnx.ops.linear.pallas_gpu import _value_tile

    assert _value_tile(None, 128, 512) == 64
    assert _value_tile(None, 128, 64) == 32  # 64 sequences x 4 tiles of 32 = 256 programs
    assert _value_tile(None, 128, 16) == 16  # B=1, N=16 at 32k tokens: 128 programs at the smallest tile
    assert _value_tile(None, 16, 1) == 16 and _value_tile(32, 16, 1) == 16 and _value_tile(32, 128, 1) == 32


def test_based_non_causal_is_refused_by_the_scan():
    q, k, v, _ = inputs()
    with pytest.raises(NotImplementedError, match="causal scan"):
        based_attention(q, k, v, causal=False, implementation="pallas_gpu")


def test_bad_arguments_are_named(monkeypatch):
    q, k, v, _ = inputs()
    for bad in (48, 8, 0, True):
        with pytest.raises(ValueError, match=r"block_size: expected a power of two >= 16"):
            lightning_pallas(q, k, v, block_size=bad, interpret=True)
    with pytest.raises(ValueError, match=r"block_v: expected a power of two >= 16"):
        lightning_pallas(q, k, v, block_v=24, interpret=True)
    with pytest.raises(ValueError, match=r"slopes: expected None or a float array of shape \[N\] = \(4,\)"):
        lightning_pallas(q, k, v, jnp.ones((K,)), interpret=True)
    with pytest.raises(ValueError, match=r"slopes: .* got int32\[4\]"):
        lightning_pallas(q, k, v, jnp.ones((N,), jnp.int32), interpret=True)
    with pytest.raises(ValueError, match="causal self attention only, got query length 37 and key length 36"):
        lightning_pallas(q, k[:, :-1], v[:, :-1], interpret=True)
    with pytest.raises(ValueError, match="interpret: expected None, True or False"):
        LinearScanPallas(interpret=1)
    with pytest.raises(ValueError, match="num_warps"):
        LinearScanPallas(num_warps=3)
    with pytest.raises(ValueError, match=r"lightning.block_size: implementation 'pallas_gpu' needs a power of two"):
        lightning_attention(q, k, v, block_size=8, implementation="pallas_gpu")
    for bad in (64, 200, 0):
        with pytest.raises(ValueError, match=r"LinearScanPallasTpu.block_size: expected a positive multiple of 128"):
            lightning_pallas_tpu(q, k, v, block_size=bad, interpret=True)
    with pytest.raises(ValueError, match=r"lightning_pallas_tpu.slopes: expected None or a float array"):
        lightning_pallas_tpu(q, k, v, jnp.ones((N, 1)), interpret=True)
    with pytest.raises(ValueError, match=r"based.block_size: implementation 'pallas_tpu' needs a multiple of 128"):
        based_attention(q, k, v, causal=True, implementation="pallas_tpu")
    monkeypatch.delenv("ATTNX_PALLAS_INTERPRET", raising=False)
    if jax.default_backend() != "gpu":
        with pytest.raises(NotImplementedError, match="needs a GPU .* interpret=True or set ATTNX_PALLAS_INTERPRET"):
            lightning_pallas(q, k, v)
    if jax.default_backend() != "tpu":
        with pytest.raises(NotImplementedError, match="needs a TPU .* interpret=True or set ATTNX_PALLAS_INTERPRET"):
            lightning_pallas_tpu(q, k, v)


# ---- the Mosaic TPU kernel (attnx/ops/linear/pallas_tpu.py): blocks of 128 rows, H and V padded to 128 ----

T_TPU = 150  # two blocks of 128, the second ragged


@functools.partial(jax.jit, static_argnames="decay")
def tpu_kernel_and_grads(q, k, v, s, cotangent, decay=True):
    fn = lambda q, k, v, s: lightning_pallas_tpu(q, k, v, s if decay else None, interpret=True)
    return _value_and_grads(fn, q, k, v, s, cotangent)


def tpu_inputs(dtype=jnp.float32, seed=6):
    """Slopes a tenth of ALiBi's, so that lambda^128 stays well above zero and the carried state matters."""
    rng = np.random.default_rng(seed)
    normal = lambda *shape: jnp.asarray(rng.standard_normal(shape), jnp.float32)
    q, k, v, cotangent = normal(1, T_TPU, N, H) * H**-0.5, normal(1, T_TPU, K, H), normal(1, T_TPU, K, 24), \
        normal(1, T_TPU, N, 24)
    return [x.astype(dtype) for x in (q, k, v, cotangent)], jnp.asarray(alibi_slopes(N)) * 0.1


def test_tpu_decayed_scan_and_gradients_match_the_reference():
    (q, k, v, cotangent), s = tpu_inputs()
    check(tpu_kernel_and_grads(q, k, v, s, cotangent), reference_and_grads(q, k, v, s, cotangent), jnp.float32)


@pytest.mark.parametrize("dtype, decay", [(jnp.bfloat16, True), (jnp.float32, False)], ids=["bf16-decay", "f32"])
def test_mosaic_lowering_for_tpu(monkeypatch, dtype, decay):
    """Builds the Mosaic MLIR of the forward, dQ and dK/dV kernels for TPU without one (block shapes, scalar
    prefetch, scratch, supported primitives); Mosaic's own compile still needs a TPU."""
    from jax import export

    monkeypatch.setattr(jax, "default_backend", lambda: "tpu")
    spec = lambda *shape: jax.ShapeDtypeStruct(shape, dtype)
    s = jnp.asarray(alibi_slopes(4)) if decay else None

    def grad_fn(q, k, v):
        f = lambda q, k, v: lightning_pallas_tpu(q, k, v, s, interpret=False)
        out, vjp = jax.vjp(f, q, k, v)
        return out, vjp(out)

    exported = export.export(jax.jit(grad_fn), platforms=["tpu"])(
        spec(1, 300, 4, 128), spec(1, 300, 2, 128), spec(1, 300, 2, 128))
    assert exported.mlir_module().count("tpu_custom_call") == 3  # forward, dQ, dK/dV


# slow: one more compile (~8 CPU-s); bfloat16 without decay, MQA, through lightning_attention's dispatch.
@pytest.mark.slow
def test_tpu_bfloat16_without_decay():
    (q, k, v, cotangent), _ = tpu_inputs(jnp.bfloat16, seed=7)
    k, v = k[:, :, :1], v[:, :, :1]
    zeros = jnp.zeros((N,), jnp.float32)
    check(tpu_kernel_and_grads(q, k, v, zeros, cotangent, decay=False),
          reference_and_grads(q, k, v, zeros, cotangent), jnp.bfloat16, decay=False)
    got = lightning_attention(q, k, v, slopes=zeros, implementation=LinearScanPallasTpu(interpret=True))
    assert_close(got, reference_and_grads(q, k, v, zeros, cotangent)[0], jnp.bfloat16, what="dispatch")


# slow: one more compile and a T=2048 reference (~10 CPU-s); the Mosaic kernel's slope gradient on a long sequence.
@pytest.mark.slow
def test_tpu_slope_gradient_on_long_sequences():
    q, k, v, cotangent, s = _long_sequence(seed=10)
    got = jax.jit(lambda *a: _value_and_grads(lambda q, k, v, s: lightning_pallas_tpu(q, k, v, s, interpret=True),
                                              *a))(q, k, v, s, cotangent)
    check(got, reference_and_grads(q, k, v, s, cotangent), jnp.float32)


# ---- slow: wider coverage, each a fresh interpret-mode compile ----

# slow: one more compile (~10 CPU-s); the default block 64 over T=100 (two blocks, 28 padded rows), a batch of shape
# [2, 1], head and value dims that need padding (H=12 -> 16, V=20 -> 32, one value tile) and float16.
@pytest.mark.slow
def test_default_tiles_batch_dims_and_float16():
    rng = np.random.default_rng(5)
    shape = lambda *s: jnp.asarray(rng.standard_normal(s), jnp.float32)
    q, k, v = shape(2, 1, 100, 4, 12) * 12**-0.5, shape(2, 1, 100, 2, 12), shape(2, 1, 100, 2, 20)
    s = jnp.asarray(alibi_slopes(4))
    got = lightning_pallas(q.astype(jnp.float16), k.astype(jnp.float16), v.astype(jnp.float16), s, interpret=True)
    assert got.shape == (2, 1, 100, 4, 20) and got.dtype == jnp.float16
    flat = lambda x: x.reshape(2, *x.shape[2:])
    want = lightning_reference(*(flat(x.astype(jnp.float16).astype(jnp.float32)) for x in (q, k, v)), s)
    assert_close(flat(got), want, jnp.float16)


# slow: two more compiles (~20 CPU-s); the string "pallas_gpu" through lightning_attention with the interpreter
# switched on by the environment variable, gradients of the causal form against the chunked implementation.
@pytest.mark.slow
def test_environment_variable_and_gradients_through_lightning_attention(monkeypatch):
    monkeypatch.setenv("ATTNX_PALLAS_INTERPRET", "1")
    q, k, v, cotangent = inputs(seed=4)

    def value_and_grads(implementation):
        fn = lambda q, k, v: lightning_attention(q, k, v, block_size=16, implementation=implementation)
        out, vjp = jax.vjp(fn, q, k, v)
        return out, vjp(cotangent)

    got, want = value_and_grads("pallas_gpu"), value_and_grads("reference")
    assert_close(got[0], want[0], jnp.float32, what="output")
    for name, g, w in zip(("query", "key", "value"), got[1], want[1]):
        assert_close(g, w, jnp.float32, "gradient", what=name)


def _tangents(q, k, v, s):
    return jnp.cos(q), jnp.sin(k), v[::-1], s * 0.5 + 0.01


@pytest.mark.parametrize("kernel", ["pallas_gpu", "pallas_tpu"])
def test_jvp_through_the_kernels(kernel):
    """Forward mode (attnx.ops.forward_mode): the forward kernel on each perturbed input's tangent plus the slope
    term; every input perturbed (decay, GQA, ragged blocks), and under vmap (the linear_call batching rule) with
    constant slopes, both against the reference's jvp."""
    if kernel == "pallas_gpu":
        q, k, v, _ = inputs(seed=12)
        s = jnp.asarray(alibi_slopes(N))
        attend = lambda q, k, v, s: lightning_pallas(q, k, v, s, block_size=BLOCK, block_v=BLOCK_V, interpret=True)
    else:
        (q, k, v, _), s = tpu_inputs(seed=13)
        attend = lambda q, k, v, s: lightning_pallas_tpu(q, k, v, s, interpret=True)

    @jax.jit
    def both(q, k, v, s):
        full = jax.jvp(attend, (q, k, v, s), _tangents(q, k, v, s))[1]
        ref = jax.jvp(lightning_reference, (q, k, v, s), _tangents(q, k, v, s))[1]
        # vmap over the batch with the slopes constant: the tangent of k only
        per_example = lambda f: jax.vmap(lambda q, k, v: jax.jvp(  # noqa: E731
            lambda k: f(q[None], k[None], v[None], s), (k,), (jnp.sin(k),))[1])(q, k, v)
        return full, ref, per_example(attend), per_example(lightning_reference)

    full, ref, mapped, mapped_ref = both(q, k, v, s)
    assert_close(full, ref, jnp.float32, "gradient", what=f"{kernel} jvp")
    assert_close(mapped, mapped_ref, jnp.float32, "gradient", what=f"{kernel} vmap jvp")
