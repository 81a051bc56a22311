"""Argument checks and static index tables shared by the local (token-grid) mechanisms: neighbourhood attention
(attnx/ops/local/neighborhood.py) and HaloNet's blocked local attention (attnx/ops/local/halo.py).

Tokens lie on a grid (h, w, ...) in row-major order, the layout the ViT/DiT layers pass as `grid=`; `grid=None`
means a 1-D sequence of the query's length. Every table is built in numpy at trace time (the grid and the window
sizes are static), so jit specialises per resolution and nothing here runs on the device.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np


def resolve_grid(name: str, grid, T: int) -> tuple[int, ...]:
    """The token grid of `T` tokens: `grid`, or (T,) when None. Tokens beyond prod(grid) would be class tokens,
    which the local mechanisms' papers never have: refused with a hint, not silently mixed into a window."""
    if grid is None:
        return (T,)
    if isinstance(grid, (int, np.integer)) and not isinstance(grid, bool):
        grid = (int(grid),)
    if not isinstance(grid, (tuple, list)) or not grid or not all(
            isinstance(g, (int, np.integer)) and not isinstance(g, bool) and g > 0 for g in grid):
        raise ValueError(f"{name}.grid: expected None or a tuple of positive ints (the token layout), got {grid!r}")
    grid = tuple(int(g) for g in grid)
    size = math.prod(grid)
    if T > size:
        raise ValueError(f"{name}: {T} query tokens but grid {grid} holds {size}; the {T - size} extra token(s) "
                         f"would be class tokens, which {name} does not handle (its paper's models have none): use "
                         f"pooling='mean' (ViTConfig.pooling) so that every token is on the grid")
    if T < size:
        raise ValueError(f"{name}: {T} query tokens cannot fill grid {grid} of {size} tokens")
    return grid


def per_axis(name: str, value, rank: int, *, minimum: int) -> tuple[int, ...]:
    """An int (the same on every axis) or one int per grid axis, each >= minimum."""
    values = (value,) * rank if isinstance(value, (int, np.integer)) and not isinstance(value, bool) else value
    if not isinstance(values, (tuple, list)) or len(values) != rank or not all(
            isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v >= minimum for v in values):
        raise ValueError(f"{name}: expected an int >= {minimum} or {rank} of them (one per grid axis), got {value!r}")
    return tuple(int(v) for v in values)


def per_axis_bool(name: str, value, rank: int) -> tuple[bool, ...]:
    values = (value,) * rank if isinstance(value, (bool, np.bool_)) else value
    if not isinstance(values, (tuple, list)) or len(values) != rank or not all(
            isinstance(v, (bool, np.bool_)) for v in values):
        raise ValueError(f"{name}: expected a bool or {rank} of them (one per grid axis), got {value!r}")
    return tuple(bool(v) for v in values)


def coordinates(grid: Sequence[int]) -> np.ndarray:
    """[prod(grid), len(grid)] row-major coordinates of every token."""
    return np.stack(np.unravel_index(np.arange(math.prod(grid)), grid), axis=-1)


def check_self(name: str, T: int, S: int) -> None:
    if S != T:
        raise ValueError(f"{name}: local attention over one token grid is self attention (patterns NS/CS); got "
                         f"query length {T} and key length {S} (cross attention is not defined)")


def read_only(*arrays: np.ndarray) -> tuple[np.ndarray, ...]:
    # Cached tables are shared between calls: freeze them so that no caller can corrupt the cache.
    for array in arrays:
        array.setflags(write=False)
    return arrays
