"""ACT: training-free attention calibration (Yu et al., 2024, "Unveiling and Harnessing Hidden Attention Sinks:
Training-Free Attention Calibration for Large Language Models", ICML 2024, arXiv 2406.15765, the attention calibration
technique (ACT) section; official code GATECH-EIC/ACT `models/llama_modelling_aug.py::atten_process_eval`).

On a post-softmax causal map A [T, T] of a selected head (code-exact, rows i, columns j):

    1. m_j = sum_i A_ij / (T - j)                     mean attention column j receives from the rows that can see it
    2. S = {j : m_j > tau} minus its first element    the first hit (normally the BOS sink) stays untouched
    3. freed_i = (1 - beta) sum_{j in S} A_ij,  A_ij <- beta A_ij for j in S
    4. A_ij += freed_i A_ij / N_i for j not in S,  N_i = sum_{j not in S} A_ij,  and A[0, 0] = 1

Rows still sum to 1. Details kept from the code: the ratios of step 4 come from the *original* map with the S
columns zeroed in rows 1.. only (row 0 keeps them; on a causal map they are 0 there anyway), and A[0, 0] is set to 1
afterwards. Departures: the code edits batch element 0 only (it evaluates one sequence at a time); here every batch
element gets its own sink set. The code detaches the ratios (`copy.deepcopy(A.detach())`); here gradients flow
through them (ACT is training-free, so this only matters to someone who trains through it). A row whose non-sink
mass N_i is 0 (impossible for a softmax row, whose entries are positive) gets no redistribution instead of the
code's 0/0.

`statistics="prefix"` is our causal variant, not in the paper: row i takes m_j from rows <= i only,
m_j^(i) = sum_{r<=i} A_rj / (i - j + 1), so no row depends on later tokens (the code's rule, "full", does: the sink
set of a prompt is chosen from all of its rows). The last row is the same under both.

Flash-epilogue form (spec §8 (b)): with o^S = sum_{j in S} A_ij v_j and o^notS the rest,
o_i = beta o^S_i + (1 + freed_i / N_i) o^notS_i. `act_flash_epilogue` takes the two accumulators and masses of a
flash pass (normalised or not: the rule only uses their ratio), so a fused kernel needs S from a first pass of
column sums (`act_sink_columns`) and two accumulators instead of one.
"""

from __future__ import annotations

from typing import Callable, Literal, Sequence

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["check_act_options", "head_mask_array", "act_sink_columns", "act_sink_set", "act_calibrate",
           "act_flash_epilogue", "act_head_search"]

F32 = jnp.float32
STATISTICS = ("full", "prefix")


def check_act_options(beta, tau, statistics) -> None:
    """Validate ACT's options once at a public entry (errors name the argument, the value and what is allowed)."""
    if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not 0.0 <= beta <= 1.0:
        raise ValueError(f"act.beta: expected a float in [0, 1] (the share of its mass a sink keeps), got {beta!r}")
    if isinstance(tau, bool) or not isinstance(tau, (int, float)) or tau < 0:
        raise ValueError(f"act.tau: expected a float >= 0 (the mean-attention threshold of a sink), got {tau!r}")
    if statistics not in STATISTICS:
        raise ValueError(f"act.statistics: expected one of {STATISTICS}, got {statistics!r}")


def _first_hit_removed(hits: jax.Array) -> jax.Array:
    """hits [..., S] bool -> the same without its lowest True index (argmax finds the first True)."""
    first = jnp.argmax(hits, axis=-1)
    return hits & (jnp.arange(hits.shape[-1]) != first[..., None])


def act_sink_columns(column_sums: jax.Array, *, tau: float = 0.1) -> jax.Array:
    """The sink set from the column sums [..., T] of a causal map (steps 1-2): bool [..., T]. This is all a fused
    kernel's first pass has to produce."""
    T = column_sums.shape[-1]
    mean = column_sums.astype(F32) / jnp.arange(T, 0, -1, dtype=F32)
    return _first_hit_removed(mean > tau)


def act_sink_set(probs: jax.Array, *, tau: float = 0.1, statistics: Literal["full", "prefix"] = "full"):
    """bool [..., T, T]: S of each row of the causal maps `probs` [..., T, T] ("full": one set for every row, from
    the column sums; "prefix": row i's set from rows <= i)."""
    check_act_options(0.5, tau, statistics)
    T = probs.shape[-1]
    if probs.shape[-2] != T:
        raise ValueError(f"act: expected square causal maps [..., T, T], got {probs.shape}")
    if statistics == "full":
        return jnp.broadcast_to(act_sink_columns(jnp.sum(probs, axis=-2), tau=tau)[..., None, :], probs.shape)
    i, j = jnp.arange(T)[:, None], jnp.arange(T)[None, :]
    prefix = jnp.cumsum(probs.astype(F32), axis=-2)  # [..., i, j] = sum_{r <= i} A_rj
    mean = jnp.where(j <= i, prefix / jnp.maximum(i - j + 1, 1), 0.0)
    return _first_hit_removed(mean > tau)


def head_mask_array(head_mask, num_heads: int) -> jax.Array:
    """bool [N] from a tuple/array of N booleans, or every head for None."""
    if head_mask is None:
        return jnp.ones((num_heads,), bool)
    m = np.asarray(head_mask) if isinstance(head_mask, (tuple, list)) else head_mask
    if m.shape != (num_heads,):
        raise ValueError(f"act.head_mask: expected {num_heads} booleans (one per head), got shape {m.shape}")
    return jnp.asarray(m, bool)


def act_calibrate(probs: jax.Array, head_mask=None, *, beta: float = 0.4, tau: float = 0.1,
                  statistics: Literal["full", "prefix"] = "full") -> jax.Array:
    """Calibrated maps: `probs` [..., N, T, T] (post-softmax, causal) with ACT applied on the heads where
    `head_mask` [N] is True (None: every head). Code-exact with statistics="full" (see the module docstring)."""
    check_act_options(beta, tau, statistics)
    a = probs.astype(F32)
    T = a.shape[-1]
    heads = head_mask_array(head_mask, a.shape[-3])
    sink = act_sink_set(a, tau=tau, statistics=statistics)
    freed = (1.0 - beta) * jnp.sum(jnp.where(sink, a, 0.0), axis=-1, keepdims=True)
    row0 = (jnp.arange(T) == 0)[:, None]
    rest = jnp.where(sink & ~row0, 0.0, a)  # the code zeroes S columns in rows 1.. only
    n = jnp.sum(rest, axis=-1, keepdims=True)
    ratios = rest / jnp.where(n > 0, n, 1.0)
    out = jnp.where(sink, beta * a, a) + freed * ratios
    out = out.at[..., 0, 0].set(1.0)
    return jnp.where(heads[:, None, None], out, a).astype(probs.dtype)


def act_flash_epilogue(acc_sink: jax.Array, acc_rest: jax.Array, mass_sink: jax.Array, mass_rest: jax.Array, *,
                       beta: float = 0.4) -> jax.Array:
    """o = beta o^S + (1 + freed / N) o^notS from a flash pass with two accumulators.

    acc_sink, acc_rest [..., V]: sum_j p_ij v_j over j in S and j not in S; mass_sink, mass_rest [...]: sum_j p_ij
    over the same sets, with p either the probabilities or the unnormalised exp(s - m) of an online softmax (the
    result divides by mass_sink + mass_rest and uses freed / N = (1 - beta) mass_sink / mass_rest)."""
    check_act_options(beta, 0.0, "full")
    ms, mr = mass_sink.astype(F32)[..., None], mass_rest.astype(F32)[..., None]
    boost = 1.0 + (1.0 - beta) * ms / jnp.where(mr > 0, mr, 1.0)
    total = ms + mr
    out = beta * acc_sink.astype(F32) + jnp.where(mr > 0, boost, 1.0) * acc_rest.astype(F32)
    return out / jnp.where(total > 0, total, 1.0)


def act_head_search(evaluate: Callable[[np.ndarray], float], num_layers: int, num_heads: int, *,
                    layers: Sequence[int] | None = None, initial: np.ndarray | None = None):
    """ACT's offline greedy head search (the paper's head-selection step; the official scripts loop one head at a
    time over layers 2-30 of Llama-2-7B-chat and keep a head when calibration-set accuracy improves).

    evaluate(head_mask) -> score, higher is better, for a bool [num_layers, num_heads] mask of calibrated heads (e.g.
    accuracy on 900 calibration samples with those heads calibrated). Heads are tried in order (layer-major, over
    `layers`, default all); each is kept iff it raises the best score so far. Returns (mask, best score, history of
    (layer, head, score, kept))."""
    for name, v in (("num_layers", num_layers), ("num_heads", num_heads)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"act_head_search.{name}: expected an int >= 1, got {v!r}")
    mask = np.zeros((num_layers, num_heads), bool) if initial is None else np.array(initial, bool)
    if mask.shape != (num_layers, num_heads):
        raise ValueError(f"act_head_search.initial: expected shape {(num_layers, num_heads)}, got {mask.shape}")
    layers = range(num_layers) if layers is None else layers
    best = float(evaluate(mask.copy()))
    history = []
    for layer in layers:
        if not 0 <= layer < num_layers:
            raise ValueError(f"act_head_search.layers: layer {layer} outside [0, {num_layers})")
        for head in range(num_heads):
            if mask[layer, head]:
                continue
            trial = mask.copy()
            trial[layer, head] = True
            score = float(evaluate(trial.copy()))
            kept = score > best
            if kept:
                mask, best = trial, score
            history.append((layer, head, score, kept))
    return mask, best, history
