"""Input generators shared by all tests: distinct sizes per axis so that a transposition fails (ARCHITECTURE §7)."""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax.numpy as jnp
import numpy as np

from attnx.mask import Mask


@dataclasses.dataclass(frozen=True)
class Case:
    """One conformance scenario. `bias` names the bias shape with axis letters or 1, e.g. ("B", "N", 1, "S");
    `mask` builds a Mask from the case (so it can use its sizes); `features` lists what the case exercises, so an
    implementation that declares a feature unsupported must raise NotImplementedError on it."""

    name: str
    batch: tuple = (2,)
    T: int = 5
    S: int = 7
    N: int = 4
    K: int = 2
    H: int = 8
    V: int = 8
    dtype: str = "float32"
    bias: tuple | None = None
    sinks: bool = False
    soft_cap: float | None = None
    mask: Callable[["Case"], Mask] | None = None
    score_mod: Callable | None = None
    mask_mod: Callable | None = None
    features: frozenset = frozenset()

    def __repr__(self) -> str:
        return self.name


def make_inputs(case: Case, seed: int = 0) -> dict:
    """query/key/value (and bias, sinks) for a case, drawn in float32 then cast to the case dtype."""
    rng = np.random.default_rng(seed)
    dt = jnp.dtype(case.dtype)

    def normal(shape, scale=1.0):
        return jnp.asarray(rng.standard_normal(shape) * scale, jnp.float32).astype(dt)

    b = case.batch
    out = dict(query=normal(b + (case.T, case.N, case.H)), key=normal(b + (case.S, case.K, case.H)),
               value=normal(b + (case.S, case.K, case.V)))
    if case.bias is not None:
        sizes = dict(N=case.N, T=case.T, S=case.S)
        shape = []
        for d in case.bias:
            if d == "B":
                shape.extend(b)
            elif d == 1 and len(shape) == 0:
                shape.extend((1,) * len(b))
            else:
                shape.append(sizes[d] if isinstance(d, str) else d)
        out["bias"] = normal(tuple(shape), 0.5)
        if "neg_inf_bias" in case.features:
            # -inf masks through the bias: one whole row (-> output 0, lse -inf) and a few single entries.
            bias = out["bias"].at[(0,) * (len(shape) - 2) + (1,)].set(-jnp.inf)
            out["bias"] = bias.at[..., 3, ::2].set(-jnp.inf)
    if case.sinks:
        out["sinks"] = normal((case.N,), 1.0).astype(jnp.float32)
    return out


def segment_ids(batch: tuple, length: int, seed: int = 1) -> jnp.ndarray:
    """Sorted packed-sequence ids [*batch, length], different per batch element."""
    rng = np.random.default_rng(seed)
    flat = []
    for _ in range(int(np.prod(batch)) if batch else 1):
        cuts = np.sort(rng.choice(np.arange(1, length), size=min(2, length - 1), replace=False))
        ids = np.zeros(length, np.int32)
        for c in cuts:
            ids[c:] += 1
        flat.append(ids)
    return jnp.asarray(np.stack(flat).reshape(batch + (length,)))


def random_bool(shape: tuple, p: float = 0.6, seed: int = 2) -> jnp.ndarray:
    return jnp.asarray(np.random.default_rng(seed).random(shape) < p)
