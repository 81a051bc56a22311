"""Static tables of TransNeXt's aggregated attention, built in numpy at trace time (the grid, window and pool sizes
are static, so jit specialises per resolution and nothing here runs on the device).

Shi, 2024, "TransNeXt: Robust Foveal Visual Perception for Vision Transformers", CVPR 2024, arXiv 2311.17132, §3.1
(pixel-focused attention), §3.2 (aggregated attention, length-scaled cosine attention) and the official code,
DaiShiResearch/TransNeXt @ c8a9974 `classification/attention_native.py` (`get_seqlen_and_mask`) and
`classification/transnext.py` (`get_relative_position_cpb`).
"""

from __future__ import annotations

import math

import numpy as np

from attnx.ops.local.tables import resolve_grid as local_grid


def resolve_grid(grid, T: int) -> tuple[int, int]:
    """The (h, w) token grid of `T` tokens in row-major order; `grid=None` is a 1-D sequence, laid out as one row
    (1, T), so the k x k window becomes a window of k along the sequence (the off-row slots are dropped)."""
    grid = local_grid("aggregated", grid, T)  # the shared layout checks, class-token hint included
    if len(grid) == 1:
        return (1, grid[0])
    if len(grid) != 2:
        raise ValueError(f"aggregated.grid: expected None or (h, w), two positive ints (the token layout), got "
                         f"{grid!r}")
    return grid


def local_offsets(window: int) -> np.ndarray:
    """[window^2, 2] (dy, dx) offsets in row-major order, the channel order of torch's `F.unfold`; slot t of every
    per-offset parameter (local bias, learnable tokens) refers to offset t."""
    radius = window // 2
    dy, dx = np.meshgrid(np.arange(-radius, radius + 1), np.arange(-radius, radius + 1), indexing="ij")
    return np.stack([dy.reshape(-1), dx.reshape(-1)], axis=-1)


def local_neighbours(grid: tuple[int, int], window: int) -> tuple[np.ndarray, np.ndarray]:
    """(index [T, window^2] int32, valid [T, window^2] bool): for token i and offset t, the row-major index of the
    key at i + offset(t), and whether it lies inside the grid. Off-grid slots are the zero padding of the code's
    unfold, which it masks to -inf: TransNeXt's window does not shift inward at borders (unlike neighbourhood
    attention), a corner token sees 4 keys of 9. Invalid slots hold index 0 (never read unmasked)."""
    h, w = grid
    offsets = local_offsets(window)
    y, x = np.divmod(np.arange(h * w), w)
    ky = y[:, None] + offsets[None, :, 0]
    kx = x[:, None] + offsets[None, :, 1]
    valid = (ky >= 0) & (ky < h) & (kx >= 0) & (kx < w)
    index = np.where(valid, ky * w + kx, 0).astype(np.int32)
    return index, valid


def length_scale(grid: tuple[int, int], window: int | None, pool_tokens: int) -> np.ndarray:
    """[T] the length scale log(n_i + P) of each query: n_i its in-grid neighbours (window None: every token, the
    full-attention stage's log N), P the pooled tokens (§3.2, "length-scaled cosine attention")."""
    if window is None:
        return np.full((grid[0] * grid[1],), math.log(grid[0] * grid[1] + pool_tokens), np.float32)
    _, valid = local_neighbours(grid, window)
    return np.log(valid.sum(-1) + pool_tokens).astype(np.float32)


def adaptive_pool_matrix(size: int, out: int) -> np.ndarray:
    """[out, size]: row p averages bin p of torch's adaptive average pooling, [floor(p size / out),
    ceil((p + 1) size / out)); bins overlap when out does not divide size, exactly as in torch."""
    matrix = np.zeros((out, size), np.float32)
    for p in range(out):
        start, stop = (p * size) // out, -((-(p + 1) * size) // out)
        matrix[p, start:stop] = 1.0 / (stop - start)
    return matrix


def pool_matrix(grid: tuple[int, int], pooled_grid: tuple[int, int]) -> np.ndarray:
    """[ph * pw, h * w]: 2-D adaptive average pooling of row-major tokens (separable: rows, then columns)."""
    return np.kron(adaptive_pool_matrix(grid[0], pooled_grid[0]), adaptive_pool_matrix(grid[1], pooled_grid[1]))


def cpb_coordinates(grid: tuple[int, int], key_grid: tuple[int, int],
                    pretrain_grid: tuple[int, int] | None = None) -> np.ndarray:
    """[T, P, 2] the log-spaced relative coordinates fed to the continuous position bias MLP, per (query, key) pair.

    Key coordinates are the adaptively average-pooled query coordinates (a pooled token sits at the mean position
    of its bin); offsets are scaled by 8 / (pretrain size - 1) per axis and mapped to sign(d) log2(1 + |d|) / log2 8.
    The code evaluates the MLP on the table of unique offsets and gathers; evaluating it per pair gives the same
    bias matrix (spec §6(e)6). A grid axis of size 1 has no offsets; the code would divide 0 by 0 there, here the
    axis's scale is taken as 1 so its coordinate is 0.
    """
    pretrain_grid = grid if pretrain_grid is None else pretrain_grid
    coords = []
    for axis in range(2):
        q_axis = np.arange(grid[axis], dtype=np.float32)
        k_axis = adaptive_pool_matrix(grid[axis], key_grid[axis]) @ q_axis
        scale = 8.0 / max(pretrain_grid[axis] - 1, 1)
        coords.append((q_axis[:, None] - k_axis[None, :]) * scale)
    qh, kh = coords[0].shape
    qw, kw = coords[1].shape
    dy = np.broadcast_to(coords[0][:, None, :, None], (qh, qw, kh, kw)).reshape(qh * qw, kh * kw)
    dx = np.broadcast_to(coords[1][None, :, None, :], (qh, qw, kh, kw)).reshape(qh * qw, kh * kw)
    relative = np.stack([dy, dx], axis=-1)
    return (np.sign(relative) * np.log2(np.abs(relative) + 1.0) / np.log2(8.0)).astype(np.float32)
