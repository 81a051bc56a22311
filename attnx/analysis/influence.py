"""MoA's attention-influence profile and span-plan selection (Fu et al., 2024, "MoA: Mixture of Sparse Attention for
Automatic Large Language Model Compression", arXiv 2406.14909, the sections on profiling (attention influence) and
optimisation (multi-objective plan search); official code thu-nics/MoA `MoA/models/llama/modify_llama_profile.py`,
`MoA/universal/elastic_block_sparse.py`).

Influence. Removing A_ij from a softmax row and renormalising the rest changes the row by dA_ij = -A_ij and
dA_in = A_in A_ij / (1 - A_ij) (n != j). To first order the loss changes by

    E_ij = sum_n dL/dA_in dA_in = -A_ij (dL/dA_ij - sum_n A_in dL/dA_in) / (1 - A_ij)

(`attention_influence`; the code adds float eps to the denominator and, because row 0 of a causal map is the single
entry A_00 = 1, replaces row 0 by -A_0j dL/dA_0j, both kept here). The profile takes |E|, sums it over calibration
samples and aggregates it in 64 x 64 blocks (`aggregate_blocks`). The loss of a plan is the summed |E| its mask drops
(`span_plan_loss`).

Optimisation. The official tool picks one (alpha, beta) per head from a grid by a multi-objective MILP (Gurobi) over
several profile lengths under a per-length average-density bound, then keeps the Pareto plan with the lowest
validation loss at an unseen length. That MILP is out of scope here; `select_span_plan` is a greedy substitute with
the same objective and constraint (loss summed over lengths, average density <= bound at every length): start every
head at its cheapest configuration and repeatedly take the upgrade with the largest loss reduction per unit of
density until none fits. It is not guaranteed optimal.

Departures: `span_plan_loss` scores the token-level sink + band mask that the attention actually uses
(`attnx.ops.spans.moa.sink_window_mask`); the official profiler scores a block-level BigBird layout (one global
block and int(alpha // 64 + beta * n_blocks) band blocks), which differs at block edges. Densities are the code's
"kv" density: the share of the sequence a head keeps in its cache, min(N, G + S_h) / N.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from attnx.ops.spans.moa import moa_spans

__all__ = ["attention_influence", "aggregate_blocks", "span_plan_loss", "span_density", "span_config_grid",
           "select_span_plan"]

F32 = jnp.float32


def attention_influence(probs: jax.Array, grad_probs: jax.Array, *, take_abs: bool = False) -> jax.Array:
    """E [..., T, S]: first-order loss change of removing each A_ij and renormalising its row (module docstring).

    probs: post-softmax maps [..., T, S]; grad_probs: dL/dA of the same shape (e.g. from `jax.vjp` of `A @ V`).
    take_abs: return |E|, the quantity the profile sums."""
    if probs.shape != grad_probs.shape:
        raise ValueError(f"attention_influence: probs {probs.shape} and grad_probs {grad_probs.shape} must have "
                         "the same shape [..., T, S]")
    a, g = probs.astype(F32), grad_probs.astype(F32)
    ag = a * g
    eps = jnp.finfo(F32).eps  # the code's guard against 1 - A = 0
    effect = a * (g - jnp.sum(ag, axis=-1, keepdims=True)) / (eps + 1.0 - a)
    effect = effect.at[..., 0, :].set(ag[..., 0, :])  # the code's row 0 rule (A_00 = 1 on causal maps)
    effect = -effect
    return jnp.abs(effect) if take_abs else effect


def aggregate_blocks(x: jax.Array, block_size: int = 64) -> jax.Array:
    """[..., T, S] -> [..., ceil(T/b), ceil(S/b)]: sums over b x b blocks (partial edge blocks are zero-padded)."""
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"aggregate_blocks.block_size: expected an int >= 1, got {block_size!r}")
    T, S = x.shape[-2:]
    nt, ns = -(-T // block_size), -(-S // block_size)
    pad = [(0, 0)] * (x.ndim - 2) + [(0, nt * block_size - T), (0, ns * block_size - S)]
    x = jnp.pad(x, pad)
    return x.reshape(x.shape[:-2] + (nt, block_size, ns, block_size)).sum(axis=(-3, -1))


def _kept(spans, sink: int, T: int) -> jax.Array:
    """bool [N, T, T]: the causal sink + band mask of each head (spans may be a traced array)."""
    i, j = jnp.arange(T)[:, None], jnp.arange(T)[None, :]
    span = jnp.asarray(spans)[:, None, None]
    return (j <= i) & ((j < sink) | (i - j < span))


def span_plan_loss(influence: jax.Array, alpha: Sequence[float], beta: Sequence[float], *,
                   sink: int = 64) -> jax.Array:
    """Loss [N] of a plan: per head, the sum of |E| [..., N, T, T] (summed over leading axes) over causal pairs that
    the head's sink + band mask with span S_h = alpha_h + beta_h T drops."""
    T = influence.shape[-1]
    if influence.shape[-2] != T or influence.ndim < 3:
        raise ValueError(f"span_plan_loss: expected causal influence maps [..., N, T, T], got {influence.shape}")
    spans = moa_spans(alpha, beta, T)
    if len(spans) != influence.shape[-3]:
        raise ValueError(f"span_plan_loss: {len(spans)} (alpha, beta) pairs for {influence.shape[-3]} heads")
    causal = jnp.tril(jnp.ones((T, T), bool))
    dropped = causal & ~_kept(spans, sink, T)
    total = jnp.abs(influence.astype(F32)).reshape((-1,) + influence.shape[-3:]).sum(0)
    return jnp.sum(jnp.where(dropped, total, 0.0), axis=(-2, -1))


def span_density(alpha: float, beta: float, length: int, *, sink: int = 64) -> float:
    """Share of the sequence one head keeps: min(N, G + S(N)) / N (the code's "kv" density)."""
    return min(length, sink + moa_spans([alpha], [beta], length)[0]) / length


def span_config_grid(*, min_length: int, max_length: int, num_alpha: int = 9,
                     betas: Sequence[float] = tuple(np.arange(9) / 8)) -> list[tuple[float, float]]:
    """Candidate (alpha, beta) pairs: alpha in linspace(-min_length, max_length, num_alpha) (MoA uses 1024 steps),
    beta in {0, 1/8, ..., 1}; valid iff alpha + beta N <= N at max_length and alpha + beta min_length > 0."""
    out = []
    for a in np.linspace(-min_length, max_length, num_alpha):
        for b in betas:
            if a + b * max_length <= max_length and a + b * min_length > 0:
                out.append((float(a), float(b)))
    if not out:
        raise ValueError(f"span_config_grid: no valid configuration for min_length={min_length}, "
                         f"max_length={max_length}")
    return out


def select_span_plan(influences: Mapping[int, jax.Array], configs: Sequence[tuple[float, float]], *,
                     density_bound: float = 0.5, sink: int = 64):
    """Greedy per-head choice of (alpha, beta) (the module docstring says how it stands in for MoA's MILP).

    influences: {profile length T: |E| [..., N, T, T]}; configs: candidate (alpha, beta) pairs. Returns
    (alphas [N], betas [N], total loss, {T: average density}). Raises ValueError when even the cheapest
    configuration of every head breaks the bound."""
    if not 0.0 < density_bound <= 1.0:
        raise ValueError(f"select_span_plan.density_bound: expected a float in (0, 1], got {density_bound!r}")
    lengths = sorted(influences)
    num_heads = {influences[t].shape[-3] for t in lengths}
    if len(num_heads) != 1:
        raise ValueError(f"select_span_plan: every profile must have the same number of heads, got {num_heads}")
    N = num_heads.pop()
    C = len(configs)
    loss = np.zeros((N, C))
    for t in lengths:
        for c, (a, b) in enumerate(configs):
            loss[:, c] += np.asarray(span_plan_loss(influences[t], [a] * N, [b] * N, sink=sink))
    density = np.array([[span_density(a, b, t, sink=sink) for t in lengths] for a, b in configs])  # [C, L]
    choice = np.array([int(np.argmin(density.max(axis=1)))] * N)
    used = density[choice].sum(axis=0)  # [L]
    if np.any(used > density_bound * N + 1e-9):
        raise ValueError(f"select_span_plan: the cheapest configuration already exceeds density_bound="
                         f"{density_bound} (average {used / N})")
    while True:
        gain = loss[np.arange(N), choice][:, None] - loss  # [N, C] loss reduction of switching head h to c
        extra = density[None, :, :] - density[choice][:, None, :]  # [N, C, L]
        fits = np.all(used[None, None, :] + extra <= density_bound * N + 1e-9, axis=-1) & (gain > 0)
        if not fits.any():
            break
        score = np.where(fits, gain / np.maximum(extra.max(axis=-1), 1e-12), -np.inf)
        h, c = np.unravel_index(int(np.argmax(score)), score.shape)
        used = used + extra[h, c]
        choice[h] = c
    alphas = [configs[c][0] for c in choice]
    betas = [configs[c][1] for c in choice]
    return alphas, betas, float(loss[np.arange(N), choice].sum()), dict(zip(lengths, used / N))
