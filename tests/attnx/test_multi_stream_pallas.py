"""The fused multi-stream Pallas kernel (attnx/ops/cross/pallas_gpu.py) against `multi_stream_reference`.

Interpret mode on CPU: forward, jvp and gradients (query, every stream's key/value, array weights) with streams of
different lengths (5, 19, 33: one, two and three key blocks, each with padded keys) and kv heads (2, 4, 1: GQA per
stream), every weight kind, float32 and bfloat16, a literal-0 stream skipped; the Triton lowering of all kernels is
built for CUDA on this CPU host (no GPU needed), so lowering limits are checked even where nothing can run them.
Shapes: T=19 (two query blocks of 16, the second padded), H=12 and V=20 (padded to 16 and 32).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnx.ops.cross.multi_stream import multi_stream_cross_attention, multi_stream_reference
from attnx.ops.cross.pallas_gpu import MultiStreamPallas, multi_stream_pallas
from attnx.testing.tolerances import assert_close

B, T, N, H, V = 2, 19, 4, 12, 20
CONFIG = MultiStreamPallas(block_q=16, block_kv=16, interpret=True)
WEIGHT_SHAPES = {"scalar": (), "row": (B, T), "head": (B, T, N)}


def _case(dtype, specs, seed=0):
    """specs: ((S, K, weight), ...); weight a Python number (static) or a WEIGHT_SHAPES key (a random array)."""
    rng = np.random.default_rng(seed)
    arr = lambda *shape: jnp.asarray(rng.standard_normal(shape), dtype)
    ks = tuple(arr(B, S, K, H) for S, K, _ in specs)
    vs = tuple(arr(B, S, K, V) for S, K, _ in specs)
    ws = tuple(arr(*WEIGHT_SHAPES[w]) if isinstance(w, str) else None for _, _, w in specs)
    statics = tuple(None if isinstance(w, str) else w for _, _, w in specs)
    return arr(B, T, N, H), ks, vs, ws, statics, arr(B, T, N, V)


@functools.partial(jax.jit, static_argnames=("statics", "implementation"))
def _run(q, ks, vs, ws, ct, *, statics, implementation):
    """Output and vjp(ct) w.r.t. (q, ks, vs, array weights); implementation None is the float32 reference."""

    def f(q, ks, vs, ws):
        if implementation is None:  # the oracle runs in float32 on the upcast inputs
            q, ks, vs, ws = jax.tree.map(lambda x: x.astype(jnp.float32), (q, ks, vs, ws))
        streams = [(k, v, s if w is None else w) for k, v, w, s in zip(ks, vs, ws, statics)]
        if implementation is None:
            return multi_stream_reference(q, streams)
        return multi_stream_cross_attention(q, streams, implementation=implementation)

    out, vjp = jax.vjp(f, q, ks, vs, ws)
    return out, vjp(ct.astype(out.dtype))


def _check(dtype, specs, implementation=CONFIG):
    q, ks, vs, ws, statics, ct = _case(dtype, specs)
    out, grads = _run(q, ks, vs, ws, ct, statics=statics, implementation=implementation)
    ref, ref_grads = _run(q, ks, vs, ws, ct, statics=statics, implementation=None)
    assert out.shape == (B, T, N, V) and out.dtype == dtype
    assert_close(out, ref, dtype, "forward", "output")
    names = ["query"] + [f"{what}[{i}]" for what in ("key", "value", "weight") for i in range(len(specs))]
    pairs = list(zip(jax.tree.leaves(grads, is_leaf=lambda x: x is None),
                     jax.tree.leaves(ref_grads, is_leaf=lambda x: x is None)))
    assert len(pairs) == len(names)
    for name, (g, r) in zip(names, pairs):
        if r is None:  # a static weight: not an input
            assert g is None, name
            continue
        assert g.shape == r.shape and g.dtype == dtype, name
        assert_close(g, r, dtype, "gradient", f"d{name}")
    return grads


def test_three_streams_float32_every_weight_kind():
    # lengths 5 / 19 / 33 (1 / 2 / 3 key blocks, all padded), kv heads 2 / 4 / 1, weights static / [B,T] / [B,T,N]
    _check(jnp.float32, ((5, 2, 1.0), (19, 4, "row"), (33, 1, "head")))


def test_jvp_and_partial_gradients_every_weight_kind():
    """Forward mode (each stream's tangent from the softmax tangent kernel, plus dw_s O_s) with every input
    perturbed; and reverse mode w.r.t. the query and one stream's value only (the other streams' dK/dV kernels are
    skipped), both against the reference."""
    specs = ((5, 2, 1.0), (19, 4, "row"), (33, 1, "head"))
    q, ks, vs, ws, statics, ct = _case(jnp.float32, specs, seed=3)

    def attend(implementation):
        def f(q, ks, vs, ws):
            streams = [(k, v, st if w is None else w) for k, v, w, st in zip(ks, vs, ws, statics)]
            if implementation is None:
                return multi_stream_reference(q, streams)
            return multi_stream_cross_attention(q, streams, implementation=implementation)
        return f

    @functools.partial(jax.jit, static_argnames="implementation")
    def both(q, ks, vs, ws, implementation):
        f = attend(implementation)
        primals = (q, ks, vs, ws)
        tangent = jax.jvp(f, primals, jax.tree.map(jnp.sin, primals))[1]
        partial = jax.grad(lambda q, v1: jnp.sum(f(q, ks, (vs[0], v1, vs[2]), ws) * ct), argnums=(0, 1))(q, vs[1])
        return tangent, partial

    got, want = both(q, ks, vs, ws, CONFIG), both(q, ks, vs, ws, None)
    for name, g, w in zip(("jvp", "dq", "dv[1]"), jax.tree.leaves(got), jax.tree.leaves(want)):
        assert_close(g, w, jnp.float32, "gradient", name)


# Slow: the float32 three-stream test covers the kernel; bf16 adds a compile.
@pytest.mark.slow
def test_two_streams_bfloat16():
    _check(jnp.bfloat16, ((33, 1, "scalar"), (5, 2, 0.5)))


def test_literal_zero_stream_is_skipped(monkeypatch):
    # Through the registry-facing function by name, with the interpreter switched on by the environment and the
    # default tiles (block_q 32 for T=19, one 32-key block for S=19): the 0-weighted stream never reaches the
    # kernel, its key/value get exact zero gradients, and the result is the one remaining stream's.
    monkeypatch.setenv("ATTNX_PALLAS_INTERPRET", "1")
    grads = _check(jnp.float32, ((33, 1, 0), (19, 4, 0.7)), implementation="pallas_gpu")
    _, (dk, _), (dv, _), _ = grads
    assert not np.any(np.asarray(dk)) and not np.any(np.asarray(dv))


def test_all_streams_zero_gives_zeros():
    q, ks, vs, _, _, _ = _case(jnp.float32, ((5, 2, 0), (19, 4, 0)))
    out = multi_stream_pallas(q, [(ks[0], vs[0], 0), (ks[1], vs[1], 0.0)], config=CONFIG)
    assert out.shape == (B, T, N, V) and not np.any(np.asarray(out))


# Slow: batch-shape plumbing of the wrapper; two extra interpret-mode compiles.
@pytest.mark.slow
def test_batch_axes_none_or_two():
    # [*B] = () and (2, 1): the wrapper flattens the batch axes (and a [*B, T, N] weight with them) and restores them
    q, ks, vs, _, _, _ = _case(jnp.float32, ((19, 2, 1.0),))
    rng = np.random.default_rng(1)
    for batch in ((), (2, 1)):
        index = (0,) if not batch else ()
        reshape = lambda x: x[index].reshape(*batch, *x.shape[1:]) if batch else x[0]
        w = jnp.asarray(rng.standard_normal((*batch, T, N)), jnp.float32)
        streams = [(reshape(ks[0]), reshape(vs[0]), w)]
        out = multi_stream_pallas(reshape(q), streams, config=CONFIG)
        assert out.shape == (*batch, T, N, V)
        assert_close(out, multi_stream_reference(reshape(q), streams), jnp.float32, "forward", f"batch {batch}")


def test_triton_lowering_for_cuda(monkeypatch):
    """Builds the Triton IR of the forward (with residuals), dQ and every dK/dV kernel for CUDA without a GPU:
    interpret mode does not check Triton's limits (power-of-two tiles, supported primitives); this does."""
    from jax import export

    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")  # the entry refuses CPU unless interpreting
    config = MultiStreamPallas(block_q=16, block_kv=32, interpret=False)
    spec = lambda dtype, *shape: jax.ShapeDtypeStruct(shape, dtype)

    def grad_fn(q, k0, v0, k1, v1, w1, k2, v2, w2):
        f = lambda q, k0, v0, k1, v1, w1, k2, v2, w2: multi_stream_pallas(
            q, [(k0, v0, 0.5), (k1, v1, w1), (k2, v2, w2)], config=config)
        out, vjp = jax.vjp(f, q, k0, v0, k1, v1, w1, k2, v2, w2)
        return out, vjp(out)

    bf16 = jnp.bfloat16
    args = (spec(bf16, B, T, N, H), spec(bf16, B, 5, 2, H), spec(bf16, B, 5, 2, V), spec(bf16, B, 19, 4, H),
            spec(bf16, B, 19, 4, V), spec(jnp.float32, B, T), spec(bf16, B, 33, 1, H), spec(bf16, B, 33, 1, V),
            spec(jnp.float32, B, T, N))
    exported = export.export(jax.jit(grad_fn), platforms=["cuda"], disabled_checks=[
        export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")])(*args)
    # forward with residuals, dQ, and one dK/dV kernel per stream
    assert exported.mlir_module().count("__gpu$xla.gpu.triton") == 5


@pytest.mark.parametrize("kwargs, message", [
    (dict(block_q=24), "block_q: expected a power of two >= 16"),
    (dict(block_kv=8), "block_kv: expected a power of two >= 16"),
    (dict(num_warps=3), "num_warps"),
    (dict(num_stages=0), "num_stages"),
    (dict(interpret="yes"), "interpret"),
])
def test_config_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        MultiStreamPallas(**kwargs)


def test_entry_errors(monkeypatch):
    q, ks, vs, _, _, _ = _case(jnp.float32, ((5, 2, 1.0),))
    monkeypatch.delenv("ATTNX_PALLAS_INTERPRET", raising=False)
    with pytest.raises(NotImplementedError, match="needs a GPU"):
        multi_stream_pallas(q, [(ks[0], vs[0], 1.0)], config=MultiStreamPallas())
    with pytest.raises(ValueError, match=r"weight shape \(2, 7\)"):
        multi_stream_pallas(q, [(ks[0], vs[0], jnp.ones((B, 7)))], config=CONFIG)
    with pytest.raises(ValueError, match="expected a MultiStreamPallas"):
        multi_stream_pallas(q, [(ks[0], vs[0], 1.0)], config="pallas_gpu")


@pytest.mark.slow  # a fourth compile of the kernels (~15 CPU-s): float16, three streams with repeated lengths
def test_float16_three_streams():
    _check(jnp.float16, ((19, 2, "head"), (5, 4, "row"), (19, 1, 1.0)))


@pytest.mark.gpu
@pytest.mark.skipif(jax.default_backend() != "gpu", reason="runs the compiled Triton kernels")
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_compiled_on_gpu(dtype):
    _check(dtype, ((5, 2, 1.0), (19, 4, "row"), (33, 1, "head")),
           implementation=MultiStreamPallas(block_q=16, block_kv=16, interpret=False))
