"""InLine attention (arXiv 2412.06590) against its oracles: spec vision_mechanisms.md §1 (e) 1-4."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnx.ops.linear.inline import (KERNELS, inline_attention, inline_weights, inline_windows, residual_conv,
                                     residual_kernels, residual_shifted)
from attnx.testing.tolerances import assert_close

F32 = jnp.float32
# Jitted once per configuration: eager calls would compile every einsum separately.
_attn = jax.jit(inline_attention, static_argnames=("grid", "kernel", "implementation"))
_shifted = jax.jit(residual_shifted, static_argnums=(2, 3))
_conv = jax.jit(residual_conv, static_argnums=(2, 3))
_weights = jax.jit(inline_weights)


def _arrays(*shapes, seed=0):
    rng = np.random.default_rng(seed)
    return tuple(jnp.asarray(rng.standard_normal(s), F32) for s in shapes)


def _np_phi(x, kernel):
    x = np.asarray(x, np.float64)
    return {"identity": x, "relu": np.maximum(x, 0), "leakyrelu": np.where(x > 0, x, 0.01 * x),
            "exp": np.exp(0.2 * x)}[kernel]


def _np_inline(q, k, v, kernel="identity"):
    """Spec §1 (e) 1: W = c (Q K^T - rowmean(Q K^T)) + 1/S, c = d^-1/2 / S, O = W V (float64, one K per N)."""
    q, k = _np_phi(q, kernel), _np_phi(k, kernel)
    S, d = k.shape[1], q.shape[-1]
    dots = np.einsum("btnh,bsnh->bnts", q, k)
    w = d**-0.5 / S * (dots - dots.mean(-1, keepdims=True)) + 1.0 / S
    return np.einsum("bnts,bsnv->btnv", w, np.asarray(v, np.float64)), w


def _np_depthwise(v, weights, grid, extra):
    """Per-sample, per-channel loop: out[y, x] = sum_ab w[a, b] v[y + a - 1, x + b - 1] (zero outside)."""
    v, weights = np.asarray(v, np.float64), np.asarray(weights, np.float64)
    B, T, N, V = v.shape
    h, w = grid
    out = np.zeros_like(v)
    for b in range(B):
        image = v[b, extra:].reshape(h, w, N, V)
        for y in range(h):
            for x in range(w):
                acc = np.zeros((N, V))
                for a in range(3):
                    for c in range(3):
                        yy, xx = y + a - 1, x + c - 1
                        if 0 <= yy < h and 0 <= xx < w:
                            acc += weights[b, :, :, a, c] * image[yy, xx]
                out[b, extra + y * w + x] = acc
    return out


@pytest.mark.parametrize("kernel", KERNELS)
def test_linear_form_equals_explicit_weights(kernel):
    q, k, v = _arrays(*[(2, 12, 2, 8)] * 3)
    expected, _ = _np_inline(q, k, v, kernel)
    np.testing.assert_allclose(_attn(q, k, v, kernel=kernel), expected, rtol=1e-5, atol=1e-5)


def test_rows_sum_to_one_and_constant_values_pass_through():
    q, k = _arrays((2, 7, 2, 8), (2, 11, 2, 8))
    w = _weights(q, k)
    np.testing.assert_allclose(jnp.sum(w, -1), 1.0, atol=1e-5)
    _, expected = _np_inline(q, k, k)
    np.testing.assert_allclose(w, expected, rtol=1e-5, atol=1e-6)
    assert float(jnp.min(w)) < 0  # unlike softmax, the weights can be negative
    ones = jnp.ones((2, 11, 2, 4), F32)
    np.testing.assert_allclose(_attn(q, k, ones), 1.0, atol=1e-5)


def test_injective_unlike_normalised_relu_linear_attention():
    """§4: ReLU linear attention phi(q).phi(k) / sum_s phi(q).phi(k_s) gives the same weights for q and 2q."""
    q, k = _arrays((1, 5, 1, 8), (1, 9, 1, 8), seed=3)
    relu = lambda q: np.einsum("bth,bsh->bts", np.maximum(q[:, :, 0], 0), np.maximum(k[:, :, 0], 0))
    normalised = lambda q: relu(q) / relu(q).sum(-1, keepdims=True)
    np.testing.assert_allclose(normalised(np.asarray(q)), normalised(2 * np.asarray(q)), rtol=1e-6)
    gap = jnp.max(jnp.abs(_weights(q, k) - _weights(2 * q, k)))
    assert float(gap) > 1e-3


def test_residual_equals_per_sample_loop():
    grid, extra = (3, 4), 1  # a class token in front of a 3x4 grid
    (v,) = _arrays((2, 13, 2, 4))
    (weights,) = _arrays((2, 2, 4, 3, 3), seed=5)
    expected = _np_depthwise(v, weights, grid, extra)
    np.testing.assert_allclose(_shifted(v, weights, grid, extra), expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(_conv(v, weights, grid, extra), expected, rtol=1e-5, atol=1e-5)
    # through the public function: the residual is what is added, the class token gets none
    q, k = _arrays((2, 13, 2, 8), (2, 13, 2, 8), seed=6)
    added = _attn(q, k, v, grid=grid, residual_weights=weights) - _attn(q, k, v, grid=grid)
    np.testing.assert_allclose(added, expected, rtol=1e-4, atol=1e-5)
    assert not np.any(np.asarray(added[:, 0]))


def test_residual_on_a_sequence_is_a_one_row_image():
    """grid=None or (L,): a 1 x L image, only the kernel's middle row reaches other tokens."""
    (v,) = _arrays((2, 6, 2, 4))
    (weights,) = _arrays((2, 2, 4, 3, 3), seed=5)
    np.testing.assert_allclose(_shifted(v, weights, (1, 6), 0), _np_depthwise(v, weights, (1, 6), 0), rtol=1e-5,
                               atol=1e-5)
    rows_zeroed = weights.at[..., 0, :].set(0.0).at[..., 2, :].set(0.0)
    np.testing.assert_allclose(_shifted(v, weights, (1, 6), 0), _shifted(v, rows_zeroed, (1, 6), 0), atol=1e-6)


@jax.jit
def _both(q, k, v, weights, cot):
    """(outputs, gradients) of the linear path and of the reference, with the local residual on a 3x4 grid + CLS."""
    results = []
    for implementation in ("linear", "reference"):
        fn = lambda q, k, v, w: inline_attention(q, k, v, grid=(3, 4), residual_weights=w, kernel="relu",
                                                 implementation=implementation)
        out, vjp = jax.vjp(fn, q, k, v, weights)
        results.append((out, vjp(cot)))
    return results


def _np_windowed(q, k, v, weights, grid, window, shift):
    """inline_swin.py's layout in numpy: roll by -shift, InLine (explicit weights) + the depth-wise residual inside
    each window x window window (row-major windows, kernels weights[:, window index]), reverse, roll back."""
    B, T, N, _ = q.shape
    h, w = grid
    image = lambda x: np.roll(np.asarray(x, np.float64).reshape(B, h, w, N, -1), (-shift, -shift), axis=(1, 2))
    qi, ki, vi = image(q), image(k), image(v)
    out = np.zeros(vi.shape)
    corners = [(y, x) for y in range(0, h, window) for x in range(0, w, window)]
    for index, (y, x) in enumerate(corners):
        cut = lambda a: a[:, y:y + window, x:x + window].reshape(B, window * window, N, -1)
        o, _ = _np_inline(cut(qi), cut(ki), cut(vi))
        o = o + _np_depthwise(cut(vi), weights[:, index], (window, window), 0)
        out[:, y:y + window, x:x + window] = o.reshape(B, window, window, N, -1)
    return np.roll(out, (shift, shift), axis=(1, 2)).reshape(B, T, N, -1)


@jax.jit
def _windowed(q, k, v, weights, cot):
    """Swin layout on a 4x6 grid (2x2 windows, shift 1): (linear out, grads), (reference out, grads), and the
    window of 8 clamped to the 4x4 subgrid (global) against no window."""
    results = []
    for implementation in ("linear", "reference"):
        fn = lambda q, k, v, w: inline_attention(q, k, v, grid=(4, 6), window=2, shift=1, residual_weights=w,
                                                 implementation=implementation)
        out, vjp = jax.vjp(fn, q, k, v, weights)
        results.append((out, vjp(cot)))
    sub = lambda x: x[:, :16]
    clamped = inline_attention(sub(q), sub(k), sub(v), grid=(4, 4), window=8, shift=4)
    return results, clamped, inline_attention(sub(q), sub(k), sub(v), grid=(4, 4))


def test_swin_windows_equal_a_per_window_loop_forward_and_gradients():
    q, k, v, cot = _arrays(*[(2, 24, 2, 4)] * 4, seed=11)
    (weights,) = _arrays((2, 6, 2, 4, 3, 3), seed=12)
    ((fast, fast_grads), (ref, ref_grads)), clamped, global_ = _windowed(q, k, v, weights, cot)
    np.testing.assert_allclose(fast, _np_windowed(q, k, v, weights, (4, 6), 2, 1), rtol=1e-4, atol=1e-5)
    assert_close(fast, ref, F32)
    for a, b in zip(fast_grads, ref_grads):
        assert_close(a, b, F32, kind="gradient")
    np.testing.assert_allclose(clamped, global_, rtol=1e-6, atol=1e-6)
    assert inline_windows((56, 56), 56 * 56, 56, 28) == ((56, 56), 56, 0)  # InLine-Swin-T stage 1: global
    assert inline_windows((14, 14), 196, 7, 3) == ((14, 14), 7, 3)


def test_linear_matches_reference_forward_and_gradients():
    q, k, v, cot = _arrays(*[(2, 13, 2, 8)] * 4, seed=7)
    (weights,) = _arrays((2, 2, 8, 3, 3), seed=8)
    (fast, fast_grads), (ref, ref_grads) = _both(q, k, v, weights, cot)
    assert_close(fast, ref, F32)
    for a, b in zip(fast_grads, ref_grads):
        assert_close(a, b, F32, kind="gradient")


def test_cross_attention_and_grouped_heads():
    q, k, v = _arrays((2, 6, 4, 8), (2, 9, 2, 8), (2, 9, 2, 4), seed=9)
    expected, _ = _np_inline(q, jnp.repeat(k, 2, axis=2), jnp.repeat(v, 2, axis=2))
    np.testing.assert_allclose(_attn(q, k, v), expected, rtol=1e-5, atol=1e-5)
    assert_close(_attn(q, k, v), _attn(q, k, v, implementation="reference"), F32)


def test_kernel_generator_matches_grouped_conv1d_loop():
    """residual_kernels == Conv1d(groups=N) -> GELU -> Conv1d(groups=N) of the code, written as loops, then the
    code's reshape(b * c, 1, 3, 3)."""
    B, N, D, V = 2, 2, 8, 4
    x_mean, w1, b1, w2, b2 = _arrays((B, D), (N, D // N, D // N), (D,), (N, D // N, 9 * V), (9 * N * V,), seed=10)
    x_mean, w1, b1, w2, b2 = (np.asarray(a, np.float64) for a in (x_mean, w1, b1, w2, b2))
    g = D // N
    hidden = np.zeros((B, D))
    for n in range(N):  # torch Conv1d weight [out, in / groups, 1]: out channel n * g + o reads inputs n * g + i
        hidden[:, n * g:(n + 1) * g] = x_mean[:, n * g:(n + 1) * g] @ w1[n] + b1[n * g:(n + 1) * g]
    gelu = lambda x: 0.5 * x * (1 + np.vectorize(__import__("math").erf)(x / np.sqrt(2)))
    hidden = gelu(hidden)
    out = np.zeros((B, 9 * N * V))
    for n in range(N):
        out[:, n * 9 * V:(n + 1) * 9 * V] = hidden[:, n * g:(n + 1) * g] @ w2[n] + b2[n * 9 * V:(n + 1) * 9 * V]
    expected = out.reshape(B * N * V, 1, 3, 3).reshape(B, N, V, 3, 3)
    got = jax.jit(residual_kernels)(*(jnp.asarray(a, F32) for a in (x_mean, w1, b1, w2, b2)))
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def test_errors():
    q, k, v = _arrays(*[(1, 4, 2, 8)] * 3)
    w = jnp.zeros((1, 2, 8, 3, 3), F32)
    with pytest.raises(ValueError, match="non-causal"):
        inline_attention(q, k, v, causal=True)
    with pytest.raises(ValueError, match="kernel"):
        inline_attention(q, k, v, kernel="softmax")
    with pytest.raises(ValueError, match="S=3"):
        inline_attention(q, k[:, :3], v[:, :3], residual_weights=w)
    with pytest.raises(ValueError, match=r"\[\*B, N, V, 3, 3\]"):
        inline_attention(q, k, v, residual_weights=w[..., :2])
    with pytest.raises(ValueError, match="cannot fill grid"):
        inline_attention(q, k, v, grid=(3, 2), residual_weights=w)
    with pytest.raises(ValueError, match="inline.grid"):
        inline_attention(q, k, v, grid=(1, 2, 2))
    with pytest.raises(ValueError, match="local_residual=False"):
        inline_attention(q, k, v, residual_weights=w, local_residual=False)
    with pytest.raises(ValueError, match="implementation"):
        inline_attention(q, k, v, implementation="chunked")
    with pytest.raises(ValueError, match="2-D grid"):
        inline_attention(q, k, v, window=2)
    with pytest.raises(ValueError, match="pooling='mean'"):
        inline_attention(q, k, v, grid=(1, 3), window=1)
    with pytest.raises(ValueError, match="not tiled"):
        inline_windows((4, 6), 24, 4, 0)
    with pytest.raises(ValueError, match="inline.shift"):
        inline_attention(q, k, v, grid=(2, 2), window=2, shift=2)
    with pytest.raises(ValueError, match="needs a window"):
        inline_attention(q, k, v, shift=1)
    with pytest.raises(ValueError, match=r"\[\*B, nW, N, V, 3, 3\]"):
        inline_attention(q, k, v, grid=(2, 2), window=1, residual_weights=w)
