"""InLine attention: injective linear attention with a local residual (Han et al., 2024, "Bridging the Divide:
Reconsidering Softmax and Linear Attention", NeurIPS 2024, arXiv 2412.06590, §4 (injectivity, eq. 5) and §5
(local modelling)). Official code: LeapLabTHU/InLine `models/inline_deit.py`, `models/inline_swin.py`
(class InLineAttention).

Per head, with phi(q), phi(k) (phi = identity by default), S keys and c = H^-1/2 / S:

    w_ij = c (phi(q_i).phi(k_j) - mean_s phi(q_i).phi(k_s)) + 1/S        every row sums to 1 (weights may be < 0)
    O    = c phi(Q) (phi(K)^T V) + (1 - H^-1/2 phi(Q) mean(phi(K))^T) mean(V)           (the code's O(S H V) form)

The paper writes the weights without the factor c; the code folds H^-1/2 / S into them (its comment: equivalent
to scaling phi(Q)). Both forms are the code's. Unlike normalised linear attention (ReLU kernel / row sum), the
map q -> weights is injective: q and 2q get different weights (§4).

Local residual (§5, the code's `self.residual`): a per-image, per-channel 3x3 depth-wise kernel
W = Conv1d(C -> C, groups=heads) -> GELU -> Conv1d(C -> 9C, groups=heads) of mean_n(x), applied (zero padding 1,
cross-correlation as torch's conv2d) to V laid out on the token grid, and added to the attention output before the
output projection. The kernel generator owns weights, so it is the model's `InLineResidual` (ROUTERS,
models/layers/mixers/inline.py); this function takes its output as `residual_weights` [*B, N, V, 3, 3]. Class
tokens (tokens before the prod(grid) grid tokens, as DeiT's CLS) are left out of the convolution and get no
residual, as inline_deit.py; they still count in S, mean(K) and mean(V) there, and so here. A 1-D layout (grid=None
or rank 1) is a 1 x L image: only the kernel's middle row reaches other tokens.

Swin layout (`window`, `shift`; inline_swin.py, SwinTransformerBlock + InLineAttention): the grid is rolled by
-shift and cut into window x window windows, and each window is one InLine problem (S = window^2 keys, its own mean
token for the residual kernels, the residual convolution zero-padded at the window border). The code clamps the
window to min(h, w) (shift 0) when it covers the grid, so InLine-Swin-T's WINDOW_SIZE 56 is global attention at
224 px. The paper does not describe windows; this follows the code, including that shifted windows are not masked
(the block passes Swin's attention mask and InLineAttention ignores it), so tokens wrapped around by the roll mix.

Kernels (`kernel`): "identity" (DeiT, Swin default), "relu", "leakyrelu" (slope 0.01, torch's default), "exp"
(exp(0.2 x)), the options of inline_swin.py. Patterns: NS; NC runs too (cross attention, S != T, without the local
residual, which needs V on the queries' grid); causal forms are not defined by the paper and are refused.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from attnx.ops.linear.common import resolve_implementation
from attnx.validation import canonicalize

IMPLEMENTATIONS = ("linear", "reference")
KERNELS = ("identity", "relu", "leakyrelu", "exp")
HIGHEST = jax.lax.Precision.HIGHEST


def feature_map(x: jax.Array, kernel: str) -> jax.Array:
    """phi of inline_swin.py, in float32."""
    x = x.astype(jnp.float32)
    if kernel == "relu":
        return jax.nn.relu(x)
    if kernel == "leakyrelu":
        return jax.nn.leaky_relu(x, 0.01)
    if kernel == "exp":
        return jnp.exp(0.2 * x)
    return x


def inline_grid(grid, T: int) -> tuple[tuple[int, int], int]:
    """((h, w), number of leading class tokens) of T tokens; grid=None or rank 1 is a 1 x L image."""
    if grid is None:
        grid = (T,)
    if isinstance(grid, (int, np.integer)) and not isinstance(grid, bool):
        grid = (int(grid),)
    if not isinstance(grid, (tuple, list)) or len(grid) not in (1, 2) or not all(
            isinstance(g, (int, np.integer)) and not isinstance(g, bool) and g > 0 for g in grid):
        raise ValueError(f"inline.grid: expected None, (L,) or (h, w) of positive ints (the token layout), got "
                         f"{grid!r}")
    grid = (1, int(grid[0])) if len(grid) == 1 else (int(grid[0]), int(grid[1]))
    if math.prod(grid) > T:
        raise ValueError(f"inline.grid: {T} tokens cannot fill grid {grid} of {math.prod(grid)} tokens")
    return grid, T - math.prod(grid)


def inline_windows(grid, T: int, window, shift) -> tuple[tuple[int, int], int, int] | None:
    """((h, w), window side, shift) of the Swin layout, or None without windows (window=None).

    inline_swin.py's rule (SwinTransformerBlock): when min(h, w) <= window the window is clamped to min(h, w) and
    the shift to 0 (InLine-Swin-T's window 56 is global at 224 px); windows tile the grid exactly (Swin's
    window_partition) and the shift is a cyclic roll by -shift before partitioning."""
    if window is None:
        if shift:
            raise ValueError(f"inline.shift={shift!r} needs a window (window=None is global attention)")
        return None
    if not isinstance(window, (int, np.integer)) or isinstance(window, bool) or window < 1:
        raise ValueError(f"inline.window: expected None or a positive int (the Swin window side), got {window!r}")
    if not isinstance(shift, (int, np.integer)) or isinstance(shift, bool) or not 0 <= shift < window:
        raise ValueError(f"inline.shift: expected an int in [0, window={window}), got {shift!r}")
    if grid is None or isinstance(grid, (int, np.integer)) or len(grid) != 2:
        raise ValueError(f"inline.window: Swin windows need a 2-D grid (h, w), got grid={grid!r}")
    layout, extra = inline_grid(grid, T)
    if extra:
        raise ValueError(f"inline.window: {extra} class token(s) before the {layout} grid; Swin windows have none: "
                         f"use pooling='mean' (ViTConfig.pooling)")
    window, shift = int(window), int(shift)
    if min(layout) <= window:
        window, shift = min(layout), 0
    if layout[0] % window or layout[1] % window:
        raise ValueError(f"inline.window={window}: the grid {layout} is not tiled by {window}x{window} windows "
                         f"(Swin partitions the map exactly)")
    return layout, window, shift


def window_partition(x: jax.Array, layout, window: int, shift: int) -> jax.Array:
    """[B, h w, ...] -> [B, nW, window^2, ...]: roll by -shift on both axes, then row-major windows of row-major
    tokens (Swin's torch.roll + window_partition)."""
    (h, w), rest = layout, x.shape[2:]
    image = x.reshape(x.shape[0], h, w, *rest)
    if shift:
        image = jnp.roll(image, (-shift, -shift), axis=(1, 2))
    image = image.reshape(x.shape[0], h // window, window, w // window, window, *rest)
    image = jnp.swapaxes(image, 2, 3)
    return image.reshape(x.shape[0], (h // window) * (w // window), window * window, *rest)


def window_reverse(x: jax.Array, layout, window: int, shift: int) -> jax.Array:
    """The inverse of `window_partition`: [B, nW, window^2, ...] -> [B, h w, ...]."""
    (h, w), rest = layout, x.shape[3:]
    image = x.reshape(x.shape[0], h // window, w // window, window, window, *rest)
    image = jnp.swapaxes(image, 2, 3).reshape(x.shape[0], h, w, *rest)
    if shift:
        image = jnp.roll(image, (shift, shift), axis=(1, 2))
    return image.reshape(x.shape[0], h * w, *rest)


def _weights(q, k, kernel, scale):
    """The explicit [B, K, G, T, S] weight matrix (the oracle; quadratic)."""
    B, T, N, H = q.shape
    K = k.shape[2]
    phi_q = feature_map(q, kernel).reshape(B, T, K, N // K, H)
    dots = jnp.einsum("btkgh,bskh->bkgts", phi_q, feature_map(k, kernel), precision=HIGHEST)
    S = k.shape[1]
    return (scale / S) * (dots - jnp.mean(dots, axis=-1, keepdims=True)) + 1.0 / S


def _reference_core(q, k, v, kernel, scale):
    B, T, N, _ = q.shape
    out = jnp.einsum("bkgts,bskv->btkgv", _weights(q, k, kernel, scale), v.astype(jnp.float32), precision=HIGHEST)
    return out.reshape(B, T, N, v.shape[-1])


def _linear_core(q, k, v, kernel, scale):
    """c phi(Q) (phi(K)^T V) + (1 - H^-1/2 phi(Q) mean(phi(K))^T) mean(V), fp32 K^T V (spec §1 (d))."""
    B, T, N, H = q.shape
    S, K = k.shape[1], k.shape[2]
    phi_q = feature_map(q, kernel).reshape(B, T, K, N // K, H)
    phi_k, v = feature_map(k, kernel), v.astype(jnp.float32)
    kv = jnp.einsum("bskh,bskv->bkhv", phi_k, v, precision=HIGHEST) * (scale / S)
    k_mean, v_mean = jnp.mean(phi_k, axis=1), jnp.mean(v, axis=1)  # [B, K, H], [B, K, V]
    out = jnp.einsum("btkgh,bkhv->btkgv", phi_q, kv, precision=HIGHEST)
    gain = 1.0 - scale * jnp.einsum("btkgh,bkh->btkg", phi_q, k_mean, precision=HIGHEST)
    out = out + gain[..., None] * v_mean[:, None, :, None, :]
    return out.reshape(B, T, N, v.shape[-1])


def _image(v, grid, extra):
    """[B, T, N, V] -> [B, h, w, N, V]: the grid tokens (after `extra` class tokens) as an image."""
    return v[:, extra:].reshape(v.shape[0], *grid, *v.shape[2:]).astype(jnp.float32)


def residual_shifted(v, weights, grid, extra):
    """[B, T, N, V] -> [B, T, N, V]: each channel of V's image cross-correlated with its own 3x3 kernel of
    `weights` [B, N, V, 3, 3] (zero padding 1) by nine shifted slices; class tokens get zero."""
    h, w = grid
    padded = jnp.pad(_image(v, grid, extra), ((0, 0), (1, 1), (1, 1), (0, 0), (0, 0)))
    weights = weights.astype(jnp.float32)
    out = sum(padded[:, a:a + h, b:b + w] * weights[:, None, None, :, :, a, b] for a in range(3) for b in range(3))
    out = out.reshape(v.shape[0], h * w, *v.shape[2:])
    return jnp.pad(out, ((0, 0), (extra, 0), (0, 0), (0, 0)))


def residual_conv(v, weights, grid, extra):
    """The same as `residual_shifted` through lax.conv_general_dilated (depth-wise, one image at a time), as the
    code's grouped F.conv2d: the oracle of the shifted-slice form."""
    B, _, N, V = v.shape
    h, w = grid

    def one(image, kernel):  # image [h, w, N, V], kernel [N, V, 3, 3]
        lhs = image.reshape(1, h, w, N * V)
        rhs = jnp.transpose(kernel.reshape(N * V, 3, 3), (1, 2, 0))[:, :, None, :]  # HWIO, I = 1 per group
        out = jax.lax.conv_general_dilated(lhs, rhs, (1, 1), ((1, 1), (1, 1)), feature_group_count=N * V,
                                           dimension_numbers=("NHWC", "HWIO", "NHWC"), precision=HIGHEST)
        return out.reshape(h * w, N, V)

    out = jax.vmap(one)(_image(v, grid, extra), weights.astype(jnp.float32))
    return jnp.pad(out, ((0, 0), (extra, 0), (0, 0), (0, 0)))


def inline_attention(query, key, value, *, causal: bool = False, grid=None, residual_weights=None,
                     kernel: str = "identity", scale: float | None = None, local_residual: bool = True,
                     window: int | None = None, shift: int = 0, implementation: str | None = None):
    """query [*B, T, N, H], key [*B, S, K, H], value [*B, S, K, V] -> [*B, T, N, V]; K divides N.

    residual_weights: [*B, N, V, 3, 3] ([*B, nW, N, V, 3, 3] with windows: one set per window), the per-image
    depth-wise kernels of the local residual (from models/layers/mixers/inline.py), or None for the attention
    alone. It needs self attention (S == T) with K == N; the last prod(grid) tokens lie row-major on grid (h, w)
    (None or (L,): a 1 x L row), any before them are class tokens. kernel: one of KERNELS. scale: H^-1/2 by default
    (c = scale / S, S the keys of the window). local_residual: read by the model's kernel generator (False builds
    none: the paper's ablation without the residual); accepted here so that one attention_kwargs dict serves the
    layer and the function, and False with residual_weights is an error.
    window, shift: InLine-Swin's layout (inline_swin.py): InLine inside each window x window window of the grid
    after a cyclic roll by -shift (Swin's shifted windows), the window clamped to min(h, w) with the shift to 0
    when it covers the grid (see `inline_windows`); self attention on a 2-D grid without class tokens. As the
    code's InLineAttention, shifted windows are not masked (Swin's attention mask is passed and ignored), the
    residual convolution zero-pads at each window's border and its kernels come from each window's mean token.
    None (default): global attention.
    implementation: "linear" (default, O(S H V)) or "reference" (the explicit weight matrix, and the residual
    through lax.conv).
    """
    if causal:
        raise ValueError("inline: InLine attention is non-causal (patterns NS, NC): the mean-centring term uses "
                         "every key; got causal=True")
    if not local_residual and residual_weights is not None:
        raise ValueError("inline: residual_weights given with local_residual=False")
    if kernel not in KERNELS:
        raise ValueError(f"inline.kernel: {kernel!r}; allowed: {KERNELS}")
    args = canonicalize(query, key, value)
    B, T, N, H = args.q.shape
    S, K, V = args.k.shape[1], args.k.shape[2], args.v.shape[3]
    scale = H**-0.5 if scale is None else float(scale)
    reference = resolve_implementation("inline", implementation, IMPLEMENTATIONS) == "reference"
    windows = inline_windows(grid, T, window, shift)
    if windows is not None and S != T:
        raise ValueError(f"inline.window: windows partition one token grid (self attention); got T={T}, S={S}")
    if residual_weights is not None:  # validated before any computation
        if S != T or K != N:
            raise ValueError(f"inline.residual_weights: the local residual convolves V on the queries' grid and "
                             f"needs self attention with K == N; got T={T}, S={S}, N={N}, K={K}")
        residual_weights = jnp.asarray(residual_weights)
        per_window = () if windows is None else ((windows[0][0] // windows[1]) * (windows[0][1] // windows[1]),)
        expected = (*args.batch_shape, *per_window, N, V, 3, 3)
        if residual_weights.shape != expected:
            raise ValueError(f"inline.residual_weights: expected shape {expected} ([*B, {'nW, ' * bool(per_window)}"
                             f"N, V, 3, 3]), got {residual_weights.shape}")
    layout, extra = inline_grid(grid, T)  # validated even when unused, so a bad layout fails the same way
    q, k, v = args.q, args.k, args.v
    if windows is not None:  # every window is one more batch row, on a window x window grid
        _, side, roll = windows
        q, k, v = (window_partition(x, layout, side, roll) for x in (q, k, v))
        q, k, v = (x.reshape(-1, *x.shape[2:]) for x in (q, k, v))
        layout = (side, side)
    core = _reference_core if reference else _linear_core
    out = core(q, k, v, kernel, scale)
    if residual_weights is not None:
        residual = residual_conv if reference else residual_shifted
        out = out + residual(v, residual_weights.reshape(-1, N, V, 3, 3), layout, extra)
    if windows is not None:
        out = window_reverse(out.reshape(B, -1, *out.shape[1:]), windows[0], windows[1], windows[2])
    out = out.astype(args.q.dtype)
    return out.reshape(args.batch_shape + out.shape[1:])


def inline_reference(query, key, value, **kwargs):
    """The explicit-weights oracle (`implementation="reference"`)."""
    return inline_attention(query, key, value, **{**kwargs, "implementation": "reference"})


def inline_weights(query, key, *, kernel: str = "identity", scale: float | None = None) -> jax.Array:
    """The implicit attention weights [*B, N, T, S] (analysis and tests: rows sum to 1)."""
    args = canonicalize(query, key, key)
    B, T, N, H = args.q.shape
    scale = H**-0.5 if scale is None else float(scale)
    w = _weights(args.q, args.k, kernel, scale).reshape(B, N, T, args.k.shape[1])
    return w.reshape(args.batch_shape + w.shape[1:])


def residual_kernels(x_mean: jax.Array, w1, b1, w2, b2) -> jax.Array:
    """The code's kernel generator, Conv1d(groups=N) -> GELU -> Conv1d(groups=N) on mean_n(x):
    x_mean [B, D], w1 [N, D/N, D/N], b1 [D], w2 [N, D/N, 9 V], b2 [9 N V] -> [B, N, V, 3, 3].

    Grouped 1x1 convolutions on a length-1 signal are block-diagonal matrices; channel g * 9V + 9 j + t of the
    second is tap t (row-major 3x3) of channel j of head g, the code's reshape(b * c, 1, 3, 3). GELU is exact (erf),
    torch's nn.GELU default.
    """
    B, D = x_mean.shape
    N = w1.shape[0]
    hidden = jnp.einsum("bgi,gio->bgo", x_mean.reshape(B, N, D // N), w1, precision=HIGHEST) + b1.reshape(N, -1)
    hidden = jax.nn.gelu(hidden, approximate=False)
    out = jnp.einsum("bgi,gio->bgo", hidden, w2, precision=HIGHEST) + b2.reshape(N, -1)
    return out.reshape(B, N, -1, 3, 3)
