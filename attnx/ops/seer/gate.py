"""SeerAttention's attention gate, its block mask and its distillation loss (Gao et al., 2024, "SeerAttention:
Learning Intrinsic Sparse Attention in Your LLMs", arXiv 2410.13276, §3.1-3.2). Math from the official code,
microsoft/SeerAttention: `seer_attn/prefill_sparse/attn_gate.py` (AttnGate, MultiHeadLinear),
`seer_attn/modules/common.py` (mask rules), `seer_attn/prefill_sparse/llama/modeling_llama_seerattn.py` (wiring,
block rotary positions, loss).

Gate, on the queries and keys *before* rotary positions, with blocks of b tokens (nb = ceil(T / b)):

    Qp = concat_{p in q_pools} pool_p(q)  [*B, nT, N, H|Pq|]     Kp = concat_{p in k_pools} pool_p(k)  [*B, nS, K, H|Pk|]
    Qg = Qp W_q (per head, no bias)       Kg = Kp W_k            (W_q: [N, H|Pq|, dg], W_k: [K or N, H|Pk|, dg])
    Qg, Kg <- RoPE at block positions 0, b, 2b, ... over dg features (theta of the model)
    logits = Qg Kg^T / sqrt(dg), block-causal mask                 [*B, N, nT, nS]

Pools are max/min/avg over each block along the sequence; a last partial block pools its valid tokens only (torch's
`ceil_mode=True` with no padding). The code skips W_q when there is one query pool and dg == H (`mask_linear_q is
None`): then W_k has N heads and is applied to keys repeated to N heads first. GQA keys are otherwise repeated to N
heads after W_k and RoPE (the code's `repeat_kv`). The training script's gate is `Qavg_Kmaxminavg` with dg = 128.

Block mask from the gate probabilities P = softmax(logits) (`get_sparse_attn_mask_from_threshold` /
`..._from_nz_ratio`): either P > threshold, or the top-k key blocks of each row with k = max(1, floor((1 -
sqrt(1 - r)) nb)) (so that about a fraction r of the causal triangle stays); then the last `dense_last` query-block
rows are made dense and, when causal, the lower triangle is kept.

Distillation loss (`LlamaSeerAttention.forward`): torch `KLDivLoss()(log_softmax(logits), GT)` with the default
'mean' reduction (the mean over every element, not per row), on query-block rows >= nb // 4 only ("remove the first
quarter of the data for training stability"). The model sums it over layers and the trainer scales it by
`gate_loss_scale` = 10.
"""

from __future__ import annotations

import math
from typing import Sequence

import jax
import jax.numpy as jnp
from jax.scipy.special import xlogy

from attnx.rotary import rotary_embedding

POOLS = ("max", "min", "avg")
MASKED_LOGIT = -1e9  # the code's `masked_fill(~mask, -1e9)`: finite, so log_softmax stays finite where GT is 0
DEFAULT_THRESHOLD = 0.0  # `SeerAttnLlamaConfig.__init__`'s default (its docstring says 2e-3, the README 5e-4)


def check_block(block) -> int:
    if isinstance(block, bool) or not isinstance(block, int) or block < 1:
        raise ValueError(f"seer.block: expected an int >= 1 (tokens per gate block), got {block!r}")
    return block


def check_pools(name: str, pools) -> tuple[str, ...]:
    if isinstance(pools, str):
        pools = (pools,)
    if not isinstance(pools, Sequence) or not pools or any(p not in POOLS for p in pools) \
            or len(set(pools)) != len(pools):
        raise ValueError(f"seer.{name}: expected a non-empty tuple of distinct pool names from {POOLS}, got "
                         f"{pools!r}")
    return tuple(pools)


def block_pool(x: jax.Array, block: int, kind: str) -> jax.Array:
    """x [*B, T, N, H] -> [*B, ceil(T / block), N, H]: max, min or mean over each block of `block` tokens; the last
    partial block pools its valid tokens only."""
    T = x.shape[-3]
    nb = -(-T // block)
    pad = nb * block - T
    x = x.astype(jnp.float32)
    widths = [(0, 0)] * x.ndim
    widths[-3] = (0, pad)
    blocks = jnp.pad(x, widths).reshape(*x.shape[:-3], nb, block, *x.shape[-2:])
    valid = (jnp.arange(nb * block) < T).reshape(nb, block, 1, 1)
    if kind == "max":
        return jnp.max(jnp.where(valid, blocks, -jnp.inf), axis=-3)
    if kind == "min":
        return jnp.min(jnp.where(valid, blocks, jnp.inf), axis=-3)
    counts = jnp.sum(valid, axis=-3).astype(jnp.float32)  # [nb, 1, 1]: block, or fewer for the last one
    return jnp.sum(jnp.where(valid, blocks, 0.0), axis=-3) / counts


def block_rotary(x: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
    """Rotary positions in the half-split ("rotate half", GPT-NeoX/Llama) layout on x [*B, n, N, d] at `positions`
    [n]; the code's `apply_rotary_emb_func(..., interleaved=False)`, i.e. the layers' own `attnx.rotary`."""
    if x.shape[-1] % 2:
        raise ValueError(f"seer: rotary positions need an even gate width, got hidden={x.shape[-1]}")
    return rotary_embedding(x, positions, theta=theta)


def _pooled(x, block, pools):
    return jnp.concatenate([block_pool(x, block, p) for p in pools], axis=-1)


def block_causal(nT: int, nS: int) -> jax.Array:
    """[nT, nS] bool: query block i sees key blocks j <= i (top-left aligned, as `Mask(causal=True)`)."""
    return jnp.arange(nS)[None, :] <= jnp.arange(nT)[:, None]


def seer_gate_logits(q_pre, k_pre, q_weight, k_weight, *, block: int = 64, q_pools=("avg",),
                     k_pools=("max", "min", "avg"), rope_theta: float | None = 10_000.0, causal: bool = True):
    """Gate logits [*B, N, nT, nS] (float32) from pre-RoPE queries [*B, T, N, H] and keys [*B, S, K, H].

    q_weight [N, H·len(q_pools), dg] or None (no query linear: one query pool and dg == H);
    k_weight [K, H·len(k_pools), dg], or [N, ...] when q_weight is None (keys repeated to N heads first).
    rope_theta: the model's rotary base (None: no rotary positions, for models without them).
    causal: entries above the block diagonal are set to MASKED_LOGIT (-1e9, as the code).
    """
    block = check_block(block)
    q_pools, k_pools = check_pools("q_pools", q_pools), check_pools("k_pools", k_pools)
    if q_pre.ndim < 3 or k_pre.ndim != q_pre.ndim or q_pre.shape[-1] != k_pre.shape[-1]:
        raise ValueError(f"seer_gate_logits: expected q_pre [*B, T, N, H] and k_pre [*B, S, K, H] with the same "
                         f"rank and H, got {q_pre.shape} and {k_pre.shape}")
    N, H = q_pre.shape[-2:]
    K = k_pre.shape[-2]
    if N % K:
        raise ValueError(f"seer_gate_logits: query heads {N} must be a multiple of key heads {K}")
    k_heads = N if q_weight is None else K
    if k_weight is None or k_weight.ndim != 3 or k_weight.shape[:2] != (k_heads, H * len(k_pools)):
        raise ValueError(f"seer_gate_logits: k_weight must be [{k_heads}, {H * len(k_pools)}, dg] (heads, H x "
                         f"{len(k_pools)} pools, gate width), got {None if k_weight is None else k_weight.shape}")
    dg = k_weight.shape[-1]
    if q_weight is None:
        if len(q_pools) != 1 or dg != H:
            raise ValueError(f"seer_gate_logits: q_weight=None needs one query pool and gate width dg == H={H}, got "
                             f"q_pools={q_pools} and dg={dg}")
    elif q_weight.shape != (N, H * len(q_pools), dg):
        raise ValueError(f"seer_gate_logits: q_weight must be [{N}, {H * len(q_pools)}, {dg}], got {q_weight.shape}")
    if rope_theta is not None and (not isinstance(rope_theta, (int, float)) or rope_theta <= 0):
        raise ValueError(f"seer.rope_theta: expected a positive number or None, got {rope_theta!r}")

    hi = jax.lax.Precision.HIGHEST
    qg = _pooled(q_pre, block, q_pools)  # [*B, nT, N, H|Pq|]
    kp = _pooled(k_pre, block, k_pools)  # [*B, nS, K, H|Pk|]
    if q_weight is not None:
        qg = jnp.einsum("...bnf,nfo->...bno", qg, q_weight.astype(jnp.float32), precision=hi)
    if k_heads == N and K < N:
        kp = jnp.repeat(kp, N // K, axis=-2)
    kg = jnp.einsum("...bkf,kfo->...bko", kp, k_weight.astype(jnp.float32), precision=hi)
    nT, nS = qg.shape[-3], kg.shape[-3]
    if rope_theta is not None:  # block i sits at position i * block (`position_ids[:, 0::block_size]`)
        qg = block_rotary(qg, jnp.arange(nT) * block, rope_theta)
        kg = block_rotary(kg, jnp.arange(nS) * block, rope_theta)
    if kg.shape[-2] < N:
        kg = jnp.repeat(kg, N // kg.shape[-2], axis=-2)
    logits = jnp.einsum("...tnd,...snd->...nts", qg, kg, precision=hi) * dg**-0.5
    if causal:
        logits = jnp.where(block_causal(nT, nS), logits, MASKED_LOGIT)
    return logits


def seer_gate_probabilities(gate_logits: jax.Array) -> jax.Array:
    """softmax over key blocks: the gate's predicted block-attention distribution (`use_softmax=True`)."""
    return jax.nn.softmax(gate_logits.astype(jnp.float32), axis=-1)


def _check_ratio(nz_ratio) -> float:
    if isinstance(nz_ratio, bool) or not isinstance(nz_ratio, (int, float)) or not 0 < nz_ratio <= 1:
        raise ValueError(f"seer.nz_ratio: expected a fraction of kept blocks in (0, 1], got {nz_ratio!r}")
    return float(nz_ratio)


def nz_ratio_top_k(nz_ratio: float, num_blocks: int) -> int:
    """Blocks kept per row for a target density r of the causal triangle: top-k rows of k = c nb keep about
    nb^2 (c - c^2 / 2) of nb^2 / 2 blocks, which is r for c = 1 - sqrt(1 - r) (the code's formula)."""
    return max(1, int((1.0 - math.sqrt(1.0 - _check_ratio(nz_ratio))) * num_blocks))


def seer_block_mask(prob: jax.Array, *, threshold: float | None = None, nz_ratio: float | None = None,
                    dense_last: int = 2, causal: bool = True) -> jax.Array:
    """Block mask [..., nT, nS] bool from gate probabilities `prob` [..., nT, nS] (True = computed).

    Exactly one of `threshold` (keep P > threshold) or `nz_ratio` (keep the top-k blocks of each row, see
    `nz_ratio_top_k`). The last `dense_last` query-block rows are then made dense (the code's
    `use_dense_for_last_block`, 2 rows; 0 switches it off); `causal` keeps the lower block triangle.
    """
    if (threshold is None) == (nz_ratio is None):
        raise ValueError(f"seer_block_mask: give exactly one of threshold or nz_ratio, got threshold={threshold!r}, "
                         f"nz_ratio={nz_ratio!r}")
    if isinstance(dense_last, bool) or not isinstance(dense_last, int) or dense_last < 0:
        raise ValueError(f"seer.dense_last: expected an int >= 0 (dense query-block rows at the end), got "
                         f"{dense_last!r}")
    nT, nS = prob.shape[-2:]
    if threshold is not None:
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)):
            raise ValueError(f"seer.threshold: expected a number (keep blocks with gate probability above it), got "
                             f"{threshold!r}")
        keep = prob > threshold
    else:
        _, chosen = jax.lax.top_k(prob, min(nz_ratio_top_k(nz_ratio, nS), nS))
        keep = jnp.any(chosen[..., None] == jnp.arange(nS), axis=-2)
    if dense_last:
        keep = keep | (jnp.arange(nT) >= nT - dense_last)[:, None]
    if causal:
        keep = keep & block_causal(nT, nS)
    return keep


def seer_gate_loss(gate_logits: jax.Array, ground_truth: jax.Array) -> jax.Array:
    """KL(GT || softmax(logits)) averaged over every element of the query-block rows >= nb // 4 (torch
    `KLDivLoss(reduction='mean')`), one layer's loss; GT gets no gradient. Logits and GT are [..., nT, nS]."""
    if gate_logits.shape != ground_truth.shape:
        raise ValueError(f"seer_gate_loss: gate_logits {gate_logits.shape} and ground_truth {ground_truth.shape} "
                         f"must have one shape")
    start = gate_logits.shape[-2] // 4
    log_p = jax.nn.log_softmax(gate_logits[..., start:, :].astype(jnp.float32), axis=-1)
    target = jax.lax.stop_gradient(ground_truth[..., start:, :].astype(jnp.float32))
    return jnp.mean(xlogy(target, target) - target * log_p)
