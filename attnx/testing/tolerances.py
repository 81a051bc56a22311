"""The one tolerance table, by dtype, for comparing any implementation against its float32 reference.

The reference always runs in float32 at the highest precision on inputs upcast from the tested dtype, so these
numbers bound only the tested implementation's own rounding. Raise a number only with a written reason here.

float32: blocked online softmax reorders sums and rescales partial results (FlashAttention-2 Alg. 1); on inputs of
    unit scale and lengths up to a few hundred the forward differs by ~1e-6 and gradients by ~1e-5 (measured on
    CPU); the table leaves ~10x headroom.
bfloat16 / float16: outputs are rounded to 8 / 11 mantissa bits and P is rounded before the P @ V product, as in
    every fused kernel; gradients accumulate several such roundings.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class Tolerance:
    atol: float
    rtol: float


TOLERANCES: dict[str, dict[str, Tolerance]] = {
    "float32": {"forward": Tolerance(2e-5, 2e-5), "gradient": Tolerance(1e-4, 1e-4)},
    "bfloat16": {"forward": Tolerance(2e-2, 2e-2), "gradient": Tolerance(6e-2, 6e-2)},
    "float16": {"forward": Tolerance(4e-3, 4e-3), "gradient": Tolerance(1e-2, 1e-2)},
}


def tolerance(dtype, kind: str = "forward") -> Tolerance:
    name = jnp.dtype(dtype).name
    if name not in TOLERANCES:
        raise KeyError(f"no tolerance for dtype {name}; known: {sorted(TOLERANCES)}")
    return TOLERANCES[name][kind]


def assert_close(actual, expected, dtype, kind: str = "forward", what: str = "") -> None:
    """np.testing.assert_allclose with the table's tolerance; non-finite values must match exactly."""
    tol = tolerance(dtype, kind)
    a = np.asarray(jnp.asarray(actual, jnp.float32))
    e = np.asarray(jnp.asarray(expected, jnp.float32))
    np.testing.assert_allclose(a, e, atol=tol.atol, rtol=tol.rtol, err_msg=f"{what} ({kind}, {jnp.dtype(dtype)})")
