"""Nystromformer: softmax attention approximated through m segment-mean landmarks (Xiong et al., 2021,
"Nystromformer: A Nystrom-Based Algorithm for Approximating Self-Attention", arXiv 2102.03902, §3.2 eq. (14),
§3.3 iterative pseudo-inverse), as benchmarked in CAB (`efficient_attention/modules/nystrom_attention.py`, pattern
NS, m = 16 landmarks).

    Q~, K~ = segment means of Q, K (m segments)
    O = softmax(Q K~^T) . pinv(softmax(Q~ K~^T)) . softmax(Q~ K^T) V    (+ depthwise conv of V, optional)

pinv(A) by the code's Newton-Schulz style iteration, 6 steps from Z0 = A^T / max_j sum_i A_ij:
    Z <- Z/4 (13 I - A Z (15 I - A Z (7 I - A Z)))

Faithful to CAB's code in: the uneven segment split when m does not divide T, the exact-softmax branch when T <= m,
the iteration count and its initial scaling, whose max column sum is taken over the whole call (every batch
element and head, as `torch.max` does), so one batch element's Z0 depends on the others'. Departure: CAB scales
both q and k by 1/sqrt(H) (logits by 1/H); the paper and its own code (mlpen/Nystromformer) scale each by H^-1/4
(logits by 1/sqrt(H)), which is what `scale=None` does here; pass `scale=1/H` for CAB's. Self attention only
(CAB: "cannot do causal / cross attention now").

conv_weight [N, C] (C odd): the optional depthwise convolution of the values along the sequence (the code's
`Conv2d(heads, heads, (C, 1), groups=heads, padding=C // 2, bias=False)`), an explicit weight; with GQA query
head n convolves the values of its key/value head.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from attnx.ops.efficient.common import (HIGHEST, check_int, group, refuse_pattern, resolve_implementation,
                                        segment_matrix, segment_means)
from attnx.validation import canonicalize

IMPLEMENTATIONS = ("linear", "reference")


def iterative_pinv(a: jax.Array, num_iterations: int = 6) -> jax.Array:
    """Approximate Moore-Penrose inverse of the row-stochastic matrices a [..., m, m] (the code's `iterative_inv`).

    Z0 = a^T / max column sum, the max over every matrix in `a` (the code's global torch.max)."""
    eye = jnp.eye(a.shape[-1], dtype=a.dtype)
    z = jnp.swapaxes(a, -1, -2) / jnp.max(jnp.sum(a, axis=-2))
    mm = lambda x, y: jnp.matmul(x, y, precision=HIGHEST)

    def step(_, z):
        az = mm(a, z)
        return mm(0.25 * z, 13 * eye - mm(az, 15 * eye - mm(az, 7 * eye - az)))

    return jax.lax.fori_loop(0, num_iterations, step, z)  # static trip count: reverse-mode differentiable


def _conv_matrix(weight: jax.Array, length: int) -> jax.Array:
    """[N, T, T] banded matrix of the depthwise 'same' convolution: out_t = sum_i w[n, i] v[t + i - C // 2]."""
    C = weight.shape[1]
    offset = jnp.arange(length)[None, :] - jnp.arange(length)[:, None] + C // 2  # [T, S]: tap index of s for t
    inside = (offset >= 0) & (offset < C)
    return jnp.where(inside[None], weight[:, jnp.clip(offset, 0, C - 1)], 0.0)


def _conv(weight: jax.Array, v: jax.Array, num_heads: int) -> jax.Array:
    """Depthwise conv along the sequence: v [B, S, K, V] -> [B, S, N, V] (query head n uses kv head n // G)."""
    C = weight.shape[1]
    v = jnp.repeat(v, num_heads // v.shape[2], axis=2)  # a [B, S, N, V] copy: the conv is per query head
    padded = jnp.pad(v, ((0, 0), (C // 2, C // 2), (0, 0), (0, 0)))
    L = v.shape[1]
    return sum(weight[None, None, :, i, None] * padded[:, i:i + L] for i in range(C))


def nystrom_attention(query, key, value, *, causal: bool = False, num_landmarks: int = 16, num_iterations: int = 6,
                      conv_weight=None, scale: float | None = None, implementation: str | None = None):
    """query [*B, T, N, H], key [*B, T, K, H], value [*B, T, K, V] -> [*B, T, N, V] (non-causal self only)."""
    args = canonicalize(query, key, value)
    B, T, N, H = args.q.shape
    S, K = args.k.shape[1], args.k.shape[2]
    refuse_pattern("nystrom", causal=causal, T=T, S=S, patterns="NS")
    check_int("nystrom.num_landmarks", num_landmarks)
    check_int("nystrom.num_iterations", num_iterations, 0)
    implementation = resolve_implementation("nystrom", implementation, IMPLEMENTATIONS)
    if conv_weight is not None:
        conv_weight = jnp.asarray(conv_weight, jnp.float32)
        if conv_weight.ndim != 2 or conv_weight.shape[0] != N or conv_weight.shape[1] % 2 == 0:
            raise ValueError(f"nystrom.conv_weight: expected [N, C] with N = {N} query heads and an odd kernel size "
                             f"C, got shape {conv_weight.shape}")
    scale = H ** -0.5 if scale is None else float(scale)
    q = args.q.astype(jnp.float32) * scale
    k, v = args.k.astype(jnp.float32), args.v.astype(jnp.float32)
    if T <= num_landmarks:  # the code's branch: exact softmax attention
        weights = jax.nn.softmax(jnp.einsum("btkgh,bskh->bkgts", group(q, K), k, precision=HIGHEST), axis=-1)
        out = jnp.einsum("bkgts,bskv->btkgv", weights, v, precision=HIGHEST).reshape(B, T, N, -1)
    else:
        out = _nystrom(q, k, v, num_landmarks, num_iterations, implementation)
    if conv_weight is not None:
        if implementation == "reference":
            out = out + jnp.einsum("nts,bsnv->btnv", _conv_matrix(conv_weight, T), jnp.repeat(v, N // K, axis=2),
                                   precision=HIGHEST)
        else:
            out = out + _conv(conv_weight, v, N)
    out = out.astype(args.q.dtype)
    return out.reshape(args.batch_shape + out.shape[1:])


def _nystrom(q, k, v, num_landmarks: int, num_iterations: int, implementation: str):
    """The landmark path on float32 q (already scaled) [B, T, N, H], k [B, S, K, H], v [B, S, K, V]."""
    B, T, N, _ = q.shape
    K = k.shape[2]
    if implementation == "reference":  # the explicit [T, S] approximate attention matrix, landmarks as matrices
        mq, mk = segment_matrix(T, num_landmarks), segment_matrix(k.shape[1], num_landmarks)
        q_land = jnp.einsum("mt,btkgh->bmkgh", mq, group(q, K), precision=HIGHEST)
        k_land = jnp.einsum("ms,bskh->bmkh", mk, k, precision=HIGHEST)
        kernel_1 = jax.nn.softmax(jnp.einsum("btkgh,bmkh->bkgtm", group(q, K), k_land, precision=HIGHEST), -1)
        kernel_2 = jax.nn.softmax(jnp.einsum("bpkgh,bmkh->bkgpm", q_land, k_land, precision=HIGHEST), -1)
        kernel_3 = jax.nn.softmax(jnp.einsum("bmkgh,bskh->bkgms", q_land, k, precision=HIGHEST), -1)
        approx = jnp.matmul(jnp.matmul(kernel_1, iterative_pinv(kernel_2, num_iterations), precision=HIGHEST),
                            kernel_3, precision=HIGHEST)  # [B, K, G, T, S]
        out = jnp.einsum("bkgts,bskv->btkgv", approx, v, precision=HIGHEST)
        return out.reshape(B, T, N, -1)
    q_land = group(segment_means(q, num_landmarks), K)  # [B, m, K, G, H]
    k_land = segment_means(k, num_landmarks)  # [B, m, K, H]
    kernel_1 = jax.nn.softmax(jnp.einsum("btkgh,bmkh->bkgtm", group(q, K), k_land, precision=HIGHEST), -1)
    kernel_2 = jax.nn.softmax(jnp.einsum("bpkgh,bmkh->bkgpm", q_land, k_land, precision=HIGHEST), -1)
    kernel_3 = jax.nn.softmax(jnp.einsum("bmkgh,bskh->bkgms", q_land, k, precision=HIGHEST), -1)
    summary = jnp.einsum("bkgms,bskv->bkgmv", kernel_3, v, precision=HIGHEST)  # m rows: O(T m) overall
    mixed = jnp.matmul(iterative_pinv(kernel_2, num_iterations), summary, precision=HIGHEST)
    out = jnp.einsum("bkgtm,bkgmv->btkgv", kernel_1, mixed, precision=HIGHEST)
    return out.reshape(B, T, N, -1)


def nystrom_reference(query, key, value, **kwargs):
    return nystrom_attention(query, key, value, implementation="reference", **kwargs)
