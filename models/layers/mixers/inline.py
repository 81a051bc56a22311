"""InLine attention's local residual kernels (Han et al., 2024, arXiv 2412.06590, §5; LeapLabTHU/InLine
models/inline_deit.py, InLineAttention.residual), owned beside the shared attention layer's projections (ROUTERS).

Why a ROUTERS module and not a whole layer (SPATIAL_MIXERS): InLine's q/k/v and output projections are the usual
dense ones, and the residual is added to the attention output before the output projection, i.e. inside the
attention function; the only extra weights are the kernel generator's, a function of the layer input x. The module
returns {"residual_weights": [B, N, V, 3, 3]} and `attnx.ops.linear.inline.inline_attention` convolves V with them
on the token grid (class tokens excluded, as DeiT's code).

The generator: Conv1d(D -> D, 1, groups=N) -> GELU -> Conv1d(D -> 9 N V, 1, groups=N) of mean_n(x), the mean over
every token (CLS included, as the code). The code has D = N V; here the value width N V may differ from D. Init:
torch's Conv1d default, uniform(+-1 / sqrt(fan_in)) for weights and biases with fan_in = D / N (timm's ViT init
touches only Linear layers, so the code keeps it).

Swin windows (attention_kwargs window / shift, inline_swin.py): the code's InLineAttention runs on each window's
tokens, so the mean token, hence the kernels, are per window: {"residual_weights": [B, nW, N, V, 3, 3]} from the
same partition (`attnx.ops.linear.inline.inline_windows` / `window_partition`) that the function applies to V.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from attnx.ops.linear.inline import inline_windows, residual_kernels, window_partition


class InLineResidual(nnx.Module):
    """{"residual_weights": [B, N, V, 3, 3]}: per-image depth-wise kernels of InLine's local residual."""

    def __init__(self, width: int, num_heads: int, *, num_kv_heads: int | None = None, head_dim: int,
                 grid=None, rngs: nnx.Rngs, param_dtype=jnp.float32, local_residual: bool = True,
                 window: int | None = None, shift: int = 0, **options):
        del options  # the mechanism's other options (kernel, scale) are the function's
        # Static layout (hashable graph metadata): the Swin windows whose mean tokens make the kernels.
        self.grid = None if grid is None else tuple(grid)
        self.window, self.shift = window, shift
        if num_kv_heads is not None and num_kv_heads != num_heads:
            raise ValueError(f"inline: the local residual convolves each query head's values; num_kv_heads="
                             f"{num_kv_heads} must equal num_heads={num_heads}")
        if width % num_heads:
            raise ValueError(f"inline: width={width} is not a multiple of num_heads={num_heads} (the kernel "
                             f"generator's grouped convolutions split the width per head)")
        self.local_residual = bool(local_residual)
        if not self.local_residual:
            return
        group = width // num_heads
        bound = group**-0.5
        uniform = lambda *shape: nnx.Param(jax.random.uniform(rngs.params(), shape, param_dtype, -bound, bound))
        self.w1 = uniform(num_heads, group, group)
        self.b1 = uniform(width)
        self.w2 = uniform(num_heads, group, 9 * head_dim)
        self.b2 = uniform(9 * num_heads * head_dim)

    def __call__(self, x: jax.Array, query: jax.Array, key: jax.Array | None = None) -> dict[str, jax.Array]:
        if not self.local_residual:
            return {}
        windows = inline_windows(self.grid, x.shape[1], self.window, self.shift)
        if windows is None:
            means = jnp.mean(x, axis=1)  # [B, D]
        else:  # each window's mean token [B, nW, D], as InLineAttention sees one window per batch row
            means = jnp.mean(window_partition(x, *windows), axis=2)
        kernels = residual_kernels(means.reshape(-1, x.shape[-1]), self.w1[...], self.b1[...], self.w2[...],
                                   self.b2[...])
        return {"residual_weights": kernels.reshape(*means.shape[:-1], *kernels.shape[1:])}
