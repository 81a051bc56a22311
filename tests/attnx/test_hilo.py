"""HiLo attention (LITv2, arXiv 2205.13213) against its oracles: spec vision_mechanisms.md §2 (e)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnx.ops.hilo.hilo import hilo_attention, hilo_heads, hilo_layer, hilo_reference, pool_tokens
from attnx.testing.tolerances import assert_close

F32 = jnp.float32
# Jitted once per configuration: eager calls would compile every einsum separately.
_attn = jax.jit(hilo_attention, static_argnames=("grid", "alpha", "window", "implementation"))
_layer = jax.jit(hilo_layer, static_argnames=("num_heads", "grid", "alpha", "window"))


def _qkv(T, N=4, H=8, seed=0, batch=2):
    rng = np.random.default_rng(seed)
    return tuple(jnp.asarray(rng.standard_normal((batch, T, N, H)), F32) for _ in range(3))


def _np_attention(q, k, v, allowed=None):
    """Plain softmax attention in float64 numpy: q [B, T, N, H], k/v [B, S, N, H], allowed [T, S] or None."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    logits = np.einsum("btnh,bsnh->bnts", q, k) / np.sqrt(q.shape[-1])
    if allowed is not None:
        logits = np.where(allowed, logits, -np.inf)
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return np.einsum("bnts,bsnh->btnh", p, v)


def _window_mask(grid, s):
    coords = np.stack(np.unravel_index(np.arange(np.prod(grid)), grid), -1) // s
    return np.all(coords[:, None] == coords[None, :], axis=-1)


def _np_pool(x, grid, s):
    """Explicit loop: average of each s x s (or s) window of row-major grid tokens, windows row-major."""
    x = np.asarray(x, np.float64)
    cells = np.stack(np.unravel_index(np.arange(np.prod(grid)), grid), -1) // s
    out = []
    for cell in np.ndindex(*(L // s for L in grid)):
        members = np.all(cells == np.asarray(cell), axis=-1)
        out.append(x[:, members].mean(axis=1))
    return np.stack(out, axis=1)


@functools.partial(jax.jit, static_argnames=("grid", "alpha", "window"))
def _both(q, k, v, cot, *, grid, alpha, window):
    """(outputs, gradients) of the windowed path and of the reference, one compile per configuration."""
    kw = dict(grid=grid, alpha=alpha, window=window)
    results = []
    for fn in (hilo_attention, hilo_reference):
        out, vjp = jax.vjp(lambda *a: fn(*a, **kw), q, k, v)
        results.append((out, vjp(cot)))
    return results


@pytest.mark.parametrize("grid,alpha,window", [((4, 4), 0.5, 2), ((8,), 0.9, 2)])
def test_windowed_matches_reference_forward_and_gradients(grid, alpha, window):
    q, k, v = _qkv(int(np.prod(grid)))
    cot = jnp.asarray(np.random.default_rng(1).standard_normal(q.shape), F32)
    (fast, fast_grads), (ref, ref_grads) = _both(q, k, v, cot, grid=grid, alpha=alpha, window=window)
    assert_close(fast, ref, F32)
    for a, b in zip(fast_grads, ref_grads):
        assert_close(a, b, F32, kind="gradient")


@pytest.mark.parametrize("grid,alpha,window", [((2, 4), 0.0, 2), ((4, 4), 1.0, 4)])
def test_windowed_matches_reference_single_branch(grid, alpha, window):
    q, k, v = _qkv(int(np.prod(grid)))
    kw = dict(grid=grid, alpha=alpha, window=window)
    assert_close(_attn(q, k, v, **kw), _attn(q, k, v, implementation="reference", **kw), F32)


def test_alpha_zero_is_window_attention():
    grid = (4, 6)
    q, k, v = _qkv(24)
    out = _attn(q, k, v, grid=grid, alpha=0.0, window=2)
    np.testing.assert_allclose(out, _np_attention(q, k, v, _window_mask(grid, 2)), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("alpha", [1.0, 0.5])
def test_window_one_is_mhsa(alpha):
    """ws == 1: every head Lo-Fi over unpooled tokens (the code's rule, whatever alpha)."""
    q, k, v = _qkv(16)
    out = _attn(q, k, v, grid=(4, 4), alpha=alpha, window=1)
    np.testing.assert_allclose(out, _np_attention(q, k, v), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("grid", [(4, 4), (6,)])
def test_lofi_is_cross_attention_to_pooled_tokens(grid):
    q, k, v = _qkv(int(np.prod(grid)))
    out = _attn(q, k, v, grid=grid, alpha=1.0, window=2)
    expected = _np_attention(q, _np_pool(k, grid, 2), _np_pool(v, grid, 2))
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(pool_tokens(k, grid, 2), _np_pool(k, grid, 2), rtol=1e-6, atol=1e-6)


def test_head_split_hifi_first():
    """Heads [0, n_hi) are Hi-Fi, the rest Lo-Fi: alpha=0.5 of 4 heads = heads 0-1 of alpha=0, 2-3 of alpha=1."""
    q, k, v = _qkv(16)
    kw = dict(grid=(4, 4), window=2)
    mixed = _attn(q, k, v, alpha=0.5, **kw)
    np.testing.assert_array_equal(mixed[:, :, :2], _attn(q, k, v, alpha=0.0, **kw)[:, :, :2])
    np.testing.assert_array_equal(mixed[:, :, 2:], _attn(q, k, v, alpha=1.0, **kw)[:, :, 2:])


def test_head_rounding():
    assert hilo_heads(12, 0.9, 2) == (2, 10)  # int(12 * 0.9) = 10 Lo-Fi heads (LITv2-S stage 3)
    assert hilo_heads(4, 0.9, 2) == (1, 3)
    assert hilo_heads(3, 0.5, 2) == (2, 1)
    assert hilo_heads(24, 0.9, 1) == (0, 24)


def _weights(D, n_hi, n_lo, d, seed=2):
    rng = np.random.default_rng(seed)
    w = lambda *shape: jnp.asarray(0.3 * rng.standard_normal(shape), F32)
    out = {}
    if n_hi:
        out.update(h_qkv=w(D, 3 * n_hi * d), h_qkv_bias=w(3 * n_hi * d), h_proj=w(n_hi * d, n_hi * d),
                   h_proj_bias=w(n_hi * d))
    if n_lo:
        out.update(l_q=w(D, n_lo * d), l_q_bias=w(n_lo * d), l_kv=w(D, 2 * n_lo * d), l_kv_bias=w(2 * n_lo * d),
                   l_proj=w(n_lo * d, n_lo * d), l_proj_bias=w(n_lo * d))
    return out


def _softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def _code_port(x, w, grid, num_heads, alpha, ws):
    """A numpy transcription of the code's HiLo.forward (torch reshapes/permutes, [B, H, W, C] input)."""
    x = np.asarray(x, np.float64).reshape(x.shape[0], *grid, -1)
    w = {n: np.asarray(a, np.float64) for n, a in w.items()}
    B, Hh, Ww, C = x.shape
    hd = C // num_heads
    n_hi, n_lo = hilo_heads(num_heads, alpha, ws)
    outs = []
    if n_hi:
        hg, wg = Hh // ws, Ww // ws
        xw = x.reshape(B, hg, ws, wg, ws, C).transpose(0, 1, 3, 2, 4, 5)
        qkv = (xw @ w["h_qkv"] + w["h_qkv_bias"]).reshape(B, hg * wg, ws * ws, 3, n_hi, hd).transpose(3, 0, 1, 4, 2, 5)
        attn = _softmax(qkv[0] @ np.swapaxes(qkv[1], -1, -2) * hd**-0.5)
        o = np.swapaxes(attn @ qkv[2], 2, 3).reshape(B, hg, wg, ws, ws, n_hi * hd)
        o = np.swapaxes(o, 2, 3).reshape(B, Hh, Ww, n_hi * hd)
        outs.append(o @ w["h_proj"] + w["h_proj_bias"])
    if n_lo:
        q = (x @ w["l_q"] + w["l_q_bias"]).reshape(B, Hh * Ww, n_lo, hd).transpose(0, 2, 1, 3)
        xp = x.reshape(B, Hh // ws, ws, Ww // ws, ws, C).mean(axis=(2, 4)).reshape(B, -1, C) if ws > 1 else \
            x.reshape(B, -1, C)
        kv = (xp @ w["l_kv"] + w["l_kv_bias"]).reshape(B, -1, 2, n_lo, hd).transpose(2, 0, 3, 1, 4)
        attn = _softmax(q @ np.swapaxes(kv[0], -1, -2) * hd**-0.5)
        o = np.swapaxes(attn @ kv[1], 1, 2).reshape(B, Hh, Ww, n_lo * hd)
        outs.append(o @ w["l_proj"] + w["l_proj_bias"])
    return np.concatenate(outs, -1).reshape(B, Hh * Ww, C)


@pytest.mark.parametrize("alpha,window", [(0.5, 2), (0.9, 1)])
def test_layer_matches_a_port_of_the_code(alpha, window):
    grid, N, d = (4, 4), 4, 4
    x = jnp.asarray(np.random.default_rng(3).standard_normal((2, 16, N * d)), F32)
    w = _weights(N * d, *hilo_heads(N, alpha, window), d)
    out = _layer(x, w, num_heads=N, grid=grid, alpha=alpha, window=window)
    np.testing.assert_allclose(out, _code_port(x, w, grid, N, alpha, window), rtol=2e-5, atol=2e-5)


def test_layer_is_attention_on_projected_heads():
    """AvgPool commutes with the affine l_kv: the layer == hilo_attention on full-resolution q/k/v heads."""
    grid, N, d, D = (4, 4), 4, 4, 16
    x = jnp.asarray(np.random.default_rng(4).standard_normal((2, 16, D)), F32)
    n_hi, n_lo = hilo_heads(N, 0.5, 2)
    w = _weights(D, n_hi, n_lo, d)
    hq, hk, hv = jnp.split((x @ w["h_qkv"] + w["h_qkv_bias"]).reshape(2, 16, 3, n_hi, d), 3, axis=2)
    lk, lv = jnp.split((x @ w["l_kv"] + w["l_kv_bias"]).reshape(2, 16, 2, n_lo, d), 2, axis=2)
    lq = (x @ w["l_q"] + w["l_q_bias"]).reshape(2, 16, n_lo, d)
    q = jnp.concatenate([hq[:, :, 0], lq], 2)
    k = jnp.concatenate([hk[:, :, 0], lk[:, :, 0]], 2)
    v = jnp.concatenate([hv[:, :, 0], lv[:, :, 0]], 2)
    heads = _attn(q, k, v, grid=grid, alpha=0.5, window=2)
    hi = heads[:, :, :n_hi].reshape(2, 16, -1) @ w["h_proj"] + w["h_proj_bias"]
    lo = heads[:, :, n_hi:].reshape(2, 16, -1) @ w["l_proj"] + w["l_proj_bias"]
    out = _layer(x, w, num_heads=N, grid=grid, alpha=0.5, window=2)
    assert_close(out, jnp.concatenate([hi, lo], -1), F32)


def test_batch_axes_and_dtype():
    q, k, v = _qkv(8, batch=4)
    shaped = [x.reshape(2, 2, *x.shape[1:]).astype(jnp.bfloat16) for x in (q, k, v)]
    out = _attn(*shaped, alpha=0.5, window=2)
    assert out.shape == (2, 2, 8, 4, 8) and out.dtype == jnp.bfloat16


def test_errors():
    q, k, v = _qkv(16)
    with pytest.raises(ValueError, match="non-causal"):
        hilo_attention(q, k, v, causal=True)
    with pytest.raises(ValueError, match="query length 16 and key length 8"):
        hilo_attention(q, k[:, :8], v[:, :8])
    with pytest.raises(ValueError, match="K=2 must equal"):
        hilo_attention(q, k[:, :, :2], v[:, :, :2])
    with pytest.raises(ValueError, match="not a multiple of window=3"):
        hilo_attention(q, k, v, grid=(4, 4), window=3)
    with pytest.raises(ValueError, match="pooling='mean'"):
        hilo_attention(q, k, v, grid=(3, 5))
    with pytest.raises(ValueError, match="alpha"):
        hilo_attention(q, k, v, alpha=1.5)
    with pytest.raises(ValueError, match="window"):
        hilo_attention(q, k, v, window=0)
    with pytest.raises(ValueError, match="implementation"):
        hilo_attention(q, k, v, implementation="pallas")
