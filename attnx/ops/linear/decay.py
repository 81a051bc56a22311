"""Per-head decay rates of Lightning Attention / TransNormerLLM: lambda_h = exp(-s_h) with ALiBi slopes s_h.

ALiBi (Press et al., 2022, "Train Short, Test Long", §3) gives head h of n the slope 2^(-8(h+1)/n) when n is a power
of two; otherwise the slopes of the closest smaller power of two, then every other slope of twice that size. The
Lightning code builds its decay from exactly these slopes (`utils/utils.py`, `_build_slope_tensor`).
"""

import math

import numpy as np


def alibi_slopes(num_heads: int) -> np.ndarray:
    """[num_heads] float32 slopes s_h > 0, largest (fastest decay) first."""
    if not isinstance(num_heads, int) or num_heads < 1:
        raise ValueError(f"alibi_slopes: num_heads must be an int >= 1, got {num_heads!r}")

    def power_of_two(n: int) -> list[float]:
        start = 2.0 ** (-8.0 / n)
        return [start ** (i + 1) for i in range(n)]

    if math.log2(num_heads).is_integer():
        return np.asarray(power_of_two(num_heads), np.float32)
    closest = 2 ** math.floor(math.log2(num_heads))
    extra = alibi_slopes(2 * closest)[0::2][: num_heads - closest]
    return np.concatenate([np.asarray(power_of_two(closest), np.float32), extra]).astype(np.float32)


def tnl_slopes(num_heads: int, layer_index: int, num_layers: int) -> np.ndarray:
    """TransNormerLLM's per-layer slopes (Qin et al., 2023, arXiv 2307.14995, §3.1): s_h * (1 - l / (L - 1) + 1e-5),
    so the first layer decays fastest and the last keeps almost no decay (1e-5 keeps it strictly positive)."""
    if not isinstance(num_layers, int) or num_layers < 1 or not 0 <= layer_index < num_layers:
        raise ValueError(f"tnl_slopes: need 0 <= layer_index < num_layers, got layer_index={layer_index!r}, "
                         f"num_layers={num_layers!r}")
    depth_fraction = layer_index / (num_layers - 1) if num_layers > 1 else 0.0
    return (alibi_slopes(num_heads) * (1.0 - depth_fraction + 1e-5)).astype(np.float32)
