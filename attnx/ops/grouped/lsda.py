"""LSDA: CrossFormer's long short distance attention with its dynamic position bias.

Wang, Yao, Chen, Lin, Cai, He, Liu, 2022, "CrossFormer: A Versatile Vision Transformer Hinging on Cross-scale
Attention", ICLR 2022, arXiv 2108.00154, §3.2 (LSDA) and §3.3 (DPB); official code cheerss/CrossFormer,
models/crossformer.py (`CrossFormerBlock`, `Attention`, `DynamicPosBias`).

Tokens on an (h, w) grid are split into groups of G x G tokens and attend only inside their group:

    SDA (short distance): adjacent G x G squares; the grid is zero-padded at the bottom/right to a multiple of G.
    LDA (long distance):  tokens spaced `interval` I apart: token (y, x) joins group (y mod I, x mod I) within its
        region of G*I x G*I tokens. The code pads to a multiple of G*I and reshapes (B, Rh, G, I, Rw, G, I, C)
        (CrossFormer++ HEAD); the ICLR code's (B, G, h/G, G, w/G, C) is the same partition when I = h / G.

Padding tokens are keys nobody may attend to (the HEAD code adds -1e6 to their logits; here they are excluded with
a `where`, which is the same to float32 precision) and their outputs are dropped. The ICLR code has no padding (it
needs h and w divisible by G); the padding follows CrossFormer++ HEAD (`pad_type=0`: bottom and right).

As in `CrossFormerBlock`, a grid with min(h, w) <= G is not partitioned: the block runs SDA with G = min(h, w), i.e.
one global group on a square grid.

Each group adds a relative position bias B[n, u, v] = table[idx(u - v), n] between its members u, v, where the
member coordinates are the (row, column) inside the G x G group (for LDA too: offsets count group members, not
pixels, as in the code) and idx is Swin's relative index (Δy + G - 1) * (2G - 1) + (Δx + G - 1). The table
[(2G-1)^2, N] comes from the DPB MLP over the integer offsets (`dynamic_position_bias`), which the model owns
(models/layers/mixers/crossformer.py) and passes in as `position_bias`.

`grid=None` means a 1-D sequence of length T (so the CAB pattern checks run): groups of G consecutive tokens (SDA)
or of tokens spaced I apart (LDA), table [2G - 1, N] indexed by Δ + G - 1. Only non-causal self attention (CAB
pattern NS) is defined: the partition is of one token grid, so cross attention and causal masks are refused.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Literal, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from attnx.ops.local.tables import resolve_grid

Mode = Literal["sda", "lda"]
MODES = ("sda", "lda")
LN_EPS = 1e-5  # nn.LayerNorm's default, used by DynamicPosBias


def _positive_int(name: str, value, allow_none: bool = False) -> None:
    if allow_none and value is None:
        return
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
        allowed = "a positive int or None" if allow_none else "a positive int"
        raise ValueError(f"lsda.{name}: expected {allowed}, got {value!r}")


def resolve_grouping(grid: tuple[int, ...], group_size: int, mode: str,
                     interval: int | None = None) -> tuple[str, int, int]:
    """(mode, G, I) that a block on `grid` really uses (CrossFormerBlock.__init__): min(grid) <= G gives SDA with
    G = min(grid); LDA's interval defaults to ceil(grid[0] / G), CrossFormer++'s `adaptive_interval`, which is the
    ICLR model's I = h / G on its square grids. For SDA the interval is returned as 1 (unused)."""
    _positive_int("group_size", group_size)
    _positive_int("interval", interval, allow_none=True)
    if mode not in MODES:
        raise ValueError(f"lsda.mode: expected one of {list(MODES)}, got {mode!r}")
    if min(grid) <= group_size:
        return "sda", int(min(grid)), 1
    if mode == "sda":
        return "sda", int(group_size), 1
    return "lda", int(group_size), int(interval if interval is not None else math.ceil(grid[0] / group_size))


@dataclasses.dataclass(frozen=True)
class GroupLayout:
    """Where every token goes, built in numpy at trace time (static per grid).

    token_index [nG, M]: the token at member m of group g (row-major token index), T for padding.
    inverse [T]: the flat position g * M + m of each token. member [T, d] / group [T]: each token's member
    coordinates and group id. member_coords [M, d]: coordinates of the M = G^d members, row-major.
    """

    grid: tuple[int, ...]
    mode: str
    group_size: int
    interval: int
    token_index: np.ndarray
    inverse: np.ndarray
    group: np.ndarray
    member: np.ndarray
    member_coords: np.ndarray

    @property
    def num_groups(self) -> int:
        return self.token_index.shape[0]

    @property
    def group_tokens(self) -> int:
        return self.token_index.shape[1]


@functools.lru_cache(maxsize=256)
def group_layout(grid: tuple[int, ...], mode: str, group_size: int, interval: int = 1) -> GroupLayout:
    """The partition of `grid` into groups of `group_size`^d tokens (mode and sizes as from `resolve_grouping`)."""
    G, I = group_size, interval
    period = G if mode == "sda" else G * I
    groups_per_axis, group_ids, member_ids = [], [], []
    for length in grid:
        padded = -(-length // period) * period
        c = np.arange(padded)
        if mode == "sda":
            group_ids.append(c // G)
            member_ids.append(c % G)
            groups_per_axis.append(padded // G)
        else:  # c = r * G * I + m * I + i: region r, member m, offset i; group (r, i)
            group_ids.append((c // period) * I + c % I)
            member_ids.append((c % period) // I)
            groups_per_axis.append(padded // period * I)
    coords = np.meshgrid(*[np.arange(len(g)) for g in group_ids], indexing="ij")
    group = np.ravel_multi_index([g[c] for g, c in zip(group_ids, coords)], groups_per_axis).reshape(-1)
    member = np.ravel_multi_index([m[c] for m, c in zip(member_ids, coords)], (G,) * len(grid)).reshape(-1)
    real = np.all([c < n for c, n in zip(coords, grid)], axis=0).reshape(-1)
    num_tokens = int(np.prod(grid))
    token = np.where(real, np.ravel_multi_index([np.minimum(c, n - 1) for c, n in zip(coords, grid)], grid)
                     .reshape(-1), num_tokens)
    token_index = np.full((int(np.prod(groups_per_axis)), G ** len(grid)), num_tokens, np.int32)
    token_index[group, member] = token
    inverse = np.zeros(num_tokens, np.int32)
    inverse[token[real]] = (group * G ** len(grid) + member)[real]
    member_coords = np.stack(np.unravel_index(np.arange(G ** len(grid)), (G,) * len(grid)), axis=-1)
    # The real cells of the padded grid, in its row-major order, are the tokens in their row-major order.
    return GroupLayout(grid, mode, G, I, token_index, inverse, group[real], member_coords[member[real]],
                       member_coords)


def relative_position_index(group_size: int, ndim: int = 2) -> np.ndarray:
    """[M, M] Swin relative index of members u, v: sum_a (u_a - v_a + G - 1) (2G - 1)^(d - 1 - a)."""
    G = group_size
    coords = np.stack(np.unravel_index(np.arange(G ** ndim), (G,) * ndim), axis=-1)
    relative = coords[:, None, :] - coords[None, :, :] + G - 1
    weights = (2 * G - 1) ** np.arange(ndim - 1, -1, -1)
    return (relative * weights).sum(-1).astype(np.int32)


def relative_offsets(group_size: int, ndim: int = 2) -> np.ndarray:
    """[(2G-1)^d, 2] the DPB MLP's inputs: integer offsets (Δy, Δx) in the table's row order (1-D: Δy = 0)."""
    span = np.arange(1 - group_size, group_size)
    grids = np.meshgrid(*([span] * ndim), indexing="ij")
    offsets = np.stack([g.reshape(-1) for g in grids], axis=-1).astype(np.float32)
    return offsets if ndim == 2 else np.concatenate([np.zeros_like(offsets), offsets], axis=-1)


def _layer_norm(x, scale, bias, eps=LN_EPS):
    mean = jnp.mean(x, -1, keepdims=True)
    variance = jnp.mean(jnp.square(x - mean), -1, keepdims=True)
    return (x - mean) * jax.lax.rsqrt(variance + eps) * scale + bias


def dynamic_position_bias(params: Mapping[str, jax.Array], group_size: int, *, ndim: int = 2,
                          residual: bool = False) -> jax.Array:
    """The DPB table [(2G-1)^d, N] (CrossFormer §3.3, `DynamicPosBias`): an MLP over the integer offsets,

        Linear(2 -> P) -> [LN -> ReLU -> Linear(P -> P)] x 2 -> LN -> ReLU -> Linear(P -> N),

    with the two middle stages residual when `residual` (the released models use residual=False). params: "proj_w"
    [2, P], "proj_b" [P]; for i in 1, 2, 3: "ln{i}_scale", "ln{i}_bias" [P], "fc{i}_w" [P, P] ([P, N] for i = 3),
    "fc{i}_b". The MLP sees raw offsets, so one set of weights serves any G (the paper's point against Swin's
    fixed-size table)."""
    _positive_int("group_size", group_size)
    if ndim not in (1, 2):
        raise ValueError(f"dynamic_position_bias.ndim: expected 1 or 2, got {ndim!r}")
    x = jnp.asarray(relative_offsets(group_size, ndim), jnp.float32)
    f32 = lambda name: jnp.asarray(params[name], jnp.float32)
    stage = lambda i, h: _layer_norm_relu_linear(h, *(f32(f"{n}{i}_{p}") for n, p in
                                                      (("ln", "scale"), ("ln", "bias"), ("fc", "w"), ("fc", "b"))))
    pos = x @ f32("proj_w") + f32("proj_b")
    for i in (1, 2):
        pos = pos + stage(i, pos) if residual else stage(i, pos)
    return stage(3, pos)


def _layer_norm_relu_linear(x, scale, bias, weight, weight_bias):
    return jax.nn.relu(_layer_norm(x, scale, bias)) @ weight + weight_bias


def _check_call(query, key, value, causal, grid, position_bias, scale, group_size, mode, interval):
    """Validates the public arguments once; returns the group layout of the grid."""
    if causal:
        raise ValueError("lsda: causal=True is not supported; LSDA partitions one token grid into groups that "
                         "attend in both directions (CAB pattern NS only)")
    if query.ndim < 3 or key.ndim != query.ndim or value.ndim != query.ndim:
        raise ValueError(f"lsda: expected query [*B, T, N, H], key [*B, S, K, H], value [*B, S, K, V] with the same "
                         f"rank, got {query.shape}, {key.shape}, {value.shape}")
    T, N = query.shape[-3], query.shape[-2]
    S, K = key.shape[-3], key.shape[-2]
    if S != T or value.shape[-3] != T:
        raise ValueError(f"lsda: self attention only (keys and values on the queries' grid): T={T} query tokens but "
                         f"S={S} keys, {value.shape[-3]} values (cross attention is not supported)")
    if N % K or value.shape[-2] != K or key.shape[-1] != query.shape[-1]:
        raise ValueError(f"lsda: heads must be N={N} query heads, a divisor K of N key/value heads and equal q/k "
                         f"head dims; got query {query.shape}, key {key.shape}, value {value.shape}")
    grid = resolve_grid("lsda", grid, T)  # the shared layout checks, class-token hint included
    if len(grid) > 2:
        raise ValueError(f"lsda.grid: expected None (a 1-D sequence) or (h, w) / (length,) of positive ints, "
                         f"got {grid!r}")
    if scale is not None and not (isinstance(scale, (int, float)) and scale > 0):
        raise ValueError(f"lsda.scale: expected a positive number or None, got {scale!r}")
    mode, G, I = resolve_grouping(grid, group_size, mode, interval)
    layout = group_layout(grid, mode, G, I)
    if position_bias is not None:
        rows = (2 * G - 1) ** len(grid)
        if tuple(position_bias.shape) != (rows, N):
            raise ValueError(f"lsda.position_bias: expected the table [(2G-1)^{len(grid)}, N] = [{rows}, {N}] for "
                             f"the effective group size G={G} on grid {grid} (mode {mode!r}), got "
                             f"{tuple(position_bias.shape)}")
    return layout


def group_tokens(x: jax.Array, layout: GroupLayout) -> jax.Array:
    """x [*B, T, ...] -> [*B, nG, M, ...]: the members of each group, zeros at padding."""
    axis = x.ndim - 3 if x.ndim >= 3 else 0
    padded = jnp.concatenate([x, jnp.zeros_like(jax.lax.slice_in_dim(x, 0, 1, axis=axis))], axis=axis)
    return jnp.take(padded, jnp.asarray(layout.token_index), axis=axis)


def ungroup_tokens(y: jax.Array, layout: GroupLayout) -> jax.Array:
    """[*B, nG, M, ...] -> [*B, T, ...]: each real token's entry; padding is dropped."""
    axis = y.ndim - 4 if y.ndim >= 4 else 0
    flat = y.reshape(*y.shape[:axis], -1, *y.shape[axis + 2:])
    return jnp.take(flat, jnp.asarray(layout.inverse), axis=axis)


def bias_within_group(position_bias: jax.Array, layout: GroupLayout) -> jax.Array:
    """[N, M, M] bias between members (Swin gather of the table)."""
    index = relative_position_index(layout.group_size, len(layout.grid))
    return jnp.transpose(jnp.take(position_bias, jnp.asarray(index), axis=0), (2, 0, 1))


def lsda_attention(query: jax.Array, key: jax.Array, value: jax.Array, *, causal: bool = False,
                   grid: tuple[int, ...] | None = None, group_size: int = 7, mode: Mode = "sda",
                   interval: int | None = None, position_bias: jax.Array | None = None,
                   scale: float | None = None, dpb_dim: int | None = None) -> jax.Array:
    """SDA or LDA (see the module docstring) of query [*B, T, N, H], key [*B, T, K, H], value [*B, T, K, V] with
    the T tokens row-major on `grid` -> [*B, T, N, V]. Grouped-query heads when K < N.

    position_bias: the DPB table [(2G-1)^d, N] for the effective G (`resolve_grouping`), or None for no bias.
    scale: default H ** -0.5. dpb_dim sizes the model's DPB MLP and is accepted here (unused) so that one
    attention_kwargs dict serves the layer and the function. Cost: nG groups of M^2 logits, M = G^d.
    """
    del dpb_dim
    layout = _check_call(query, key, value, causal, grid, position_bias, scale, group_size, mode, interval)
    N, K, H = query.shape[-2], key.shape[-2], query.shape[-1]
    scale = H ** -0.5 if scale is None else scale
    q = group_tokens(query, layout)  # [*B, nG, M, N, H]
    q = q.reshape(*q.shape[:-2], K, N // K, H)
    k, v = group_tokens(key, layout), group_tokens(value, layout)  # [*B, nG, M, K, H|V]
    logits = jnp.einsum("...mkjh,...skh->...kjms", q, k, preferred_element_type=jnp.float32) * scale
    if position_bias is not None:
        bias = bias_within_group(position_bias.astype(jnp.float32), layout)
        logits = logits + bias.reshape(K, N // K, *bias.shape[1:])
    valid = jnp.asarray(layout.token_index < layout.inverse.shape[0])  # [nG, M] real keys
    # A finite floor, not -inf: groups made only of padding (LDA with padding) then stay finite, gradients too.
    logits = jnp.where(valid[:, None, None, None, :], logits, jnp.finfo(jnp.float32).min)
    probabilities = jax.nn.softmax(logits, axis=-1).astype(value.dtype)
    out = jnp.einsum("...kjms,...skv->...mkjv", probabilities, v)
    out = out.reshape(*out.shape[:-3], N, out.shape[-1])
    return ungroup_tokens(out, layout)


def lsda_reference(query: jax.Array, key: jax.Array, value: jax.Array, *, causal: bool = False,
                   grid: tuple[int, ...] | None = None, group_size: int = 7, mode: Mode = "sda",
                   interval: int | None = None, position_bias: jax.Array | None = None,
                   scale: float | None = None, dpb_dim: int | None = None) -> jax.Array:
    """The naive oracle: dense softmax attention over all T tokens in float32 with a [T, T] same-group mask and the
    dense [N, T, T] relative bias between members of one group."""
    del dpb_dim
    layout = _check_call(query, key, value, causal, grid, position_bias, scale, group_size, mode, interval)
    N, K, H = query.shape[-2], key.shape[-2], query.shape[-1]
    scale = H ** -0.5 if scale is None else scale
    q = query.astype(jnp.float32)
    k = jnp.repeat(key.astype(jnp.float32), N // K, axis=-2)
    v = jnp.repeat(value.astype(jnp.float32), N // K, axis=-2)
    logits = jnp.einsum("...tnh,...snh->...nts", q, k, precision=jax.lax.Precision.HIGHEST) * scale
    same = layout.group[:, None] == layout.group[None, :]
    if position_bias is not None:
        G, d = layout.group_size, len(layout.grid)
        offsets = layout.member[:, None, :] - layout.member[None, :, :] + G - 1  # [T, T, d]
        rows = (offsets * (2 * G - 1) ** np.arange(d - 1, -1, -1)).sum(-1)
        dense = jnp.take(position_bias.astype(jnp.float32), jnp.asarray(rows), axis=0)  # [T, T, N]
        logits = logits + jnp.where(jnp.asarray(same)[..., None], dense, 0.0).transpose(2, 0, 1)
    logits = jnp.where(jnp.asarray(same), logits, -jnp.inf)
    out = jnp.einsum("...nts,...snv->...tnv", jax.nn.softmax(logits, axis=-1), v,
                     precision=jax.lax.Precision.HIGHEST)
    return out.astype(query.dtype)
