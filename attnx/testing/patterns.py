"""The CAB four-pattern property checks (Zhang et al., 2023, "CAB: Comprehensive Attention Benchmarking on Long
Sequence Modeling", §2; Shark-NLP/CAB `scripts/attention_pattern/test_available_pattern_for_attention.py`).

A mechanism *passes* a pattern when it runs in that pattern and, for the causal ones, satisfies causality:

    NS  fn(x, x, x, causal=False) runs, output [B, T, N, V] finite.
    NC  fn(q, kv, kv, causal=False) with T != S runs, output finite.
    CS  fn(x, x, x, causal=True): output i on the full sequence equals output i on the prefix x[:i+1].
    CC  fn(q, kv, kv, causal=True), T != S: output i with all queries equals output i with the query prefix
        q[:i+1], keys/values fixed.

CAB's tolerance is |delta|.sum() < 1e-4 per row; here it is max |delta| < 1e-5 (float32). A mechanism that does not
support a pattern must refuse it with ValueError or NotImplementedError; the registry test asserts that exactly
the declared patterns pass.

The causal property is checked in two parts that together cover CAB's per-prefix definition at a fraction of its
compiles (one per sequence length; the registry runs this for every entry): every row i must not change when the
later inputs (positions > i) are replaced by other values at the full length (no leak from the future: one shape,
T - 1 runs), and the rows of the prefixes of lengths `PREFIX_LENGTHS` must equal the full run's (no dependence
on the total length, e.g. a normaliser counting T; short and middle prefixes, where chunk and block boundaries
fall differently than at T).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from attnx.registry import AttentionSpec

ATOL = 1e-5
PREFIX_LENGTHS = (1, 4)


def _inputs(T: int, S: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    q = jnp.asarray(rng.standard_normal((2, T, 4, 8)), jnp.float32)
    kv = jnp.asarray(rng.standard_normal((2, S, 4, 8)), jnp.float32)
    return q, kv


def check_pattern(spec: AttentionSpec, pattern: str, T: int = 6, S: int = 9, **kwargs) -> bool:
    """True when `spec.fn` passes CAB pattern `pattern` (see module docstring); False when it refuses it or
    violates causality. Any other exception propagates (a crash is a bug, not a refusal)."""
    causal = pattern in ("CS", "CC")
    cross = pattern in ("NC", "CC")
    S_eff = S if cross else T
    q, kv = _inputs(T, S_eff)
    if not cross:
        kv = q
    kw = {**spec.defaults, **kwargs}
    fn = jax.jit(lambda q, kv: spec.fn(q, kv, kv, causal=causal, **kw))
    try:
        full = fn(q, kv)
    except (ValueError, NotImplementedError):
        return False
    if full.shape[:-1] != q.shape[:-1] or not bool(jnp.all(jnp.isfinite(full))):
        return False
    if not causal:
        return True
    rng, q_np = np.random.default_rng(1), np.asarray(q)
    for i in range(T - 1):  # replace everything after position i (in numpy: no per-shape eager compile)
        q_alt = q_np.copy()
        q_alt[:, i + 1:] = rng.standard_normal(q_alt[:, i + 1:].shape)
        q_alt = jnp.asarray(q_alt)
        kv_alt = kv if cross else q_alt
        if not _rows_equal(fn(q_alt, kv_alt), full, i):
            return False
    for length in sorted({min(n, T) for n in PREFIX_LENGTHS}):
        kv_i = kv if cross else kv[:, :length]
        if not _rows_equal(fn(q[:, :length], kv_i), full, length - 1):
            return False
    return True


def _rows_equal(part: jax.Array, full: jax.Array, i: int) -> bool:
    return float(jnp.max(jnp.abs(part[:, i] - full[:, i]))) <= ATOL


def supported_patterns(spec: AttentionSpec, **kwargs) -> frozenset:
    return frozenset(p for p in ("NS", "CS", "NC", "CC") if check_pattern(spec, p, **kwargs))
