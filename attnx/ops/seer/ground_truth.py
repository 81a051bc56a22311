"""The ground truth SeerAttention's gate is distilled against (Gao et al., 2024, arXiv 2410.13276, §3.2): the block
max-pool of the model's own (post-RoPE) softmax attention map, each row normalised to sum 1:

    A = softmax(q k^T scale)  [*B, N, T, S]        GT[i, j] = max_{r in block i, c in block j} A[r, c]
    GT[i, :] <- GT[i, :] / sum_j GT[i, j]

`block_maxpool_gt` is the reference (dense A, then reshape and max). `block_maxpool_gt_chunked` is the official
kernel's algorithm (`seer_attn/kernels/attn_pooling_kernel_2d.py`, a flash forward with a side output) in plain JAX:
a scan over key blocks keeps, per query row, the largest logit of each key block and that block's log-sum-exp;
once the row's total log-sum-exp is known, exp(rowmax - lse) is the largest probability of the block, and the max
over the block's rows gives GT. It holds [*B, N, T, nS] values, never [T, S].

Causal masks are top-left aligned (query t sees keys 0..t, as `Mask(causal=True)`); GQA maps query head n to key
head n // (N / K). Both return float32 [*B, N, ceil(T / block), ceil(S / block)].
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from attnx.ops.seer.gate import check_block

_HI = jax.lax.Precision.HIGHEST


def _check(query, key, block):
    check_block(block)
    if query.ndim < 3 or key.ndim != query.ndim or query.shape[-1] != key.shape[-1] \
            or query.shape[:-3] != key.shape[:-3] or query.shape[-2] % key.shape[-2]:
        raise ValueError(f"block_maxpool_gt: expected query [*B, T, N, H] and key [*B, S, K, H] with N a multiple of "
                         f"K, got {query.shape} and {key.shape}")


def _grouped(query, key):
    """query [*B, T, N, H] -> [*B, T, K, G, H] in float32; key -> float32."""
    *batch, T, N, H = query.shape
    K = key.shape[-2]
    return query.astype(jnp.float32).reshape(*batch, T, K, N // K, H), key.astype(jnp.float32)


def _normalise_rows(pooled):
    return pooled / jnp.sum(pooled, axis=-1, keepdims=True)


def _pool_rows(x, block):
    """[..., T, n] -> [..., ceil(T / block), n]: max over each block of rows; missing rows count as 0 (x >= 0)."""
    T = x.shape[-2]
    nb = -(-T // block)
    widths = [(0, 0)] * x.ndim
    widths[-2] = (0, nb * block - T)
    return jnp.max(jnp.pad(x, widths).reshape(*x.shape[:-2], nb, block, x.shape[-1]), axis=-2)


def block_maxpool_gt(query, key, *, block: int = 64, causal: bool = True, scale: float | None = None):
    """Reference: the dense attention probabilities, max-pooled over block x block tiles, rows normalised."""
    _check(query, key, block)
    *batch, T, N, H = query.shape
    S = key.shape[-3]
    scale = H**-0.5 if scale is None else scale
    q, k = _grouped(query, key)
    logits = jnp.einsum("...tkgh,...skh->...kgts", q, k, precision=_HI) * scale
    if causal:
        logits = jnp.where(jnp.arange(S)[None, :] <= jnp.arange(T)[:, None], logits, -jnp.inf)
    probs = jax.nn.softmax(logits, axis=-1).reshape(*batch, N, T, S)
    nS = -(-S // block)
    widths = [(0, 0)] * probs.ndim
    widths[-1] = (0, nS * block - S)
    col_pooled = jnp.max(jnp.pad(probs, widths).reshape(*batch, N, T, nS, block), axis=-1)  # [*B, N, T, nS]
    return _normalise_rows(_pool_rows(col_pooled, block))


def block_maxpool_gt_chunked(query, key, *, block: int = 64, causal: bool = True, scale: float | None = None):
    """The same values as `block_maxpool_gt`, from a scan over key blocks (memory O(T·S / block), not O(T·S))."""
    _check(query, key, block)
    *batch, T, N, H = query.shape
    S, K = key.shape[-3:-1]
    scale = H**-0.5 if scale is None else scale
    q, k = _grouped(query, key)
    nS = -(-S // block)
    widths = [(0, 0)] * k.ndim
    widths[-3] = (0, nS * block - S)
    k_blocks = jnp.moveaxis(jnp.pad(k, widths).reshape(*batch, nS, block, K, H), -4, 0)  # [nS, *B, block, K, H]
    rows = jnp.arange(T)[:, None]

    def one_key_block(_, inputs):
        j, kj = inputs
        cols = j * block + jnp.arange(block)[None, :]
        live = cols < S
        if causal:
            live = live & (cols <= rows)
        logits = jnp.einsum("...tkgh,...skh->...kgts", q, kj, precision=_HI) * scale  # [*B, K, G, T, block]
        logits = jnp.where(live, logits, -jnp.inf)
        # A block with no live key in a row gives -inf for both; exp(-inf - lse) = 0 below.
        return None, (jnp.max(logits, axis=-1), jax.nn.logsumexp(logits, axis=-1))

    _, (row_max, block_lse) = jax.lax.scan(one_key_block, None, (jnp.arange(nS), k_blocks))  # [nS, *B, K, G, T]
    lse = jax.nn.logsumexp(block_lse, axis=0)  # every row sees key 0, so this is finite
    block_max_prob = jnp.exp(row_max - lse)  # the largest probability of each (row, key block)
    col_pooled = jnp.moveaxis(block_max_prob, 0, -1).reshape(*batch, N, T, nS)
    return _normalise_rows(_pool_rows(col_pooled, block))
