"""HaloNet's blocked local self-attention: queries in non-overlapping b x b blocks, each block attending to its
(b + 2h) x (b + 2h) "halo" window, with factorised relative position embeddings.

Vaswani et al., 2021, "Scaling Local Self-Attention for Parameter Efficient Visual Backbones", CVPR 2021,
arXiv 2103.12731, §2 ("blocked local self-attention" with haloing; the subsection number was not checked against
the paper), relative embeddings as in Ramachandran et al., 2019, "Stand-Alone Self-Attention in Vision Models",
arXiv 1906.05909, §3. No official code was released; this follows timm's port (huggingface/pytorch-image-models
timm/layers/halo_attn.py: `HaloAttn`, `PosEmbedRel`, `rel_logits_1d`), including its details:
    - keys and values are zero-padded by h on every side of the (projected) feature map and each block's window is
      cut from the padded map, so border windows contain zero keys with zero values; timm does **not** mask them
      (they enter the softmax with logit 0 + relative logit). `mask_padding=True` masks them instead.
    - logits = scale q.k + q.r_y[i_y] + q.r_x[i_x] (timm's default scale_pos_embed=False: the relative logits are
      not scaled); one table r_a [2w_a - 1, H] per axis, w_a = b_a + 2 h_a, shared by all heads.
    - the table index is timm's rel-to-abs indexing: window position j (0 .. w - 1) seen from query position i in
      its block (0 .. b - 1) reads row j - i + w - 1. (Relative to the query, the key's offset is j - h - i, so rows
      0 .. 2h - 1 of each table are never read; kept for weight compatibility with timm.)
Generalised here to any grid rank with a block and halo per axis: grid=None is a 1-D sequence (the same as a
(1, T) image with block (1, b) and halo (0, h): the constant height logit cancels in the softmax). Patterns: NS only
(self attention on one grid).

Stride 2 (spec §4 (b); timm HaloAttn(stride=2)): when the block is a multiple of the stride, timm's query projection
is a 1x1 convolution with stride s, so the queries are the pixels 0, s, 2s, ... of each axis; each full-resolution
block keeps its (b + 2h)^d window and its (b/s)^d subsampled queries attend to it, and the output lies on the
subsampled grid (`stride=s`: T = prod(grid / s) queries, S = prod(grid) keys; `strided_queries` subsamples a
full-resolution query). timm's relative logits then index the query by its position in the subsampled block, row
j - i + w - 1 with i in 0 .. b/s - 1, not by its pixel offset s i: followed for parity. Otherwise (odd block, or
avg_down=True) timm runs stride 1 and average-pools the output 2x2: `avg_down`. Where it can run: the output has
fewer tokens than the input, so it is not a token mixer of a ViT block (whose residual keeps T); timm uses it in
ResNet bottlenecks whose shortcut downsamples (byoanet's halonet models, 'self_attn' blocks with stride 2 at the
first block of a stage). It is the attnx function here; no model part uses it yet.

Implementations: "blocked" (default): static gathers to [B, blocks, b^d] queries and [B, blocks, w^d] keys/values,
O(T w^d / b^d) memory (about 3.1x the keys at b=8, h=3); "reference": dense attention of every query over the whole
zero-padded map through attnx's reference attention, with a [T, S_padded] mask and the relative logits as a dense
bias (the oracle).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from attnx.api import dot_product_attention
from attnx.mask import Mask
from attnx.ops.local.tables import check_self, coordinates, per_axis, read_only, resolve_grid
from attnx.validation import canonicalize

IMPLEMENTATIONS = ("blocked", "reference")
HIGHEST = jax.lax.Precision.HIGHEST
_Q, _W = "ijl", "uvw"  # einsum letters of the query-in-block and window axes (grids of rank <= 3)


@functools.lru_cache(maxsize=64)
def halo_tables(grid: tuple, block: tuple, halo: tuple, stride: tuple | None = None):
    """(query_index [nb, (b/s)^d] into the query grid, window_index [nb, w^d] into the zero-padded grid, inside
    [nb, w^d] bool: the window position lies in the image, rel_index: per axis [b_a / s_a, w_a] timm table rows).

    stride s (default 1): the queries lie on the grid subsampled by s (pixels 0, s, 2s, ... of each axis, timm's
    strided 1x1 query convolution); block c's queries are the (b/s)^d subsampled pixels of its full-resolution
    b^d block and its window is unchanged."""
    stride = stride or (1,) * len(grid)
    padded = tuple(L + 2 * h for L, h in zip(grid, halo))
    q_grid = tuple(L // s for L, s in zip(grid, stride))
    q_block = tuple(b // s for b, s in zip(block, stride))
    blocks = tuple(L // b for L, b in zip(grid, block))
    window = tuple(b + 2 * h for b, h in zip(block, halo))
    block_coords = coordinates(blocks)  # [nb, d]
    block_origin = block_coords * np.asarray(block)  # top-left of each block (image coordinates)
    in_block = coordinates(q_block)  # [(b/s)^d, d]
    in_window = coordinates(window)  # [w^d, d]
    q_coords = (block_coords * np.asarray(q_block))[:, None, :] + in_block[None]  # [nb, (b/s)^d, d], query grid
    w_coords = block_origin[:, None, :] + in_window[None]  # padded coordinates: origin - h + pos + h
    query_index = np.ravel_multi_index(tuple(np.moveaxis(q_coords, -1, 0)), q_grid)
    window_index = np.ravel_multi_index(tuple(np.moveaxis(w_coords, -1, 0)), padded)
    image = w_coords - np.asarray(halo)
    inside = np.all((image >= 0) & (image < np.asarray(grid)), axis=-1)
    # timm's rel_logits_1d on the (b/s)-query block: row j - i + w - 1 with i the query's index in the subsampled
    # block (not its pixel offset s i): timm's indexing, kept for parity (its "FIXME not clear" stride handling).
    rel = tuple(np.arange(w)[None, :] - np.arange(b)[:, None] + w - 1 for b, w in zip(q_block, window))
    return read_only(query_index.astype(np.int32), window_index.astype(np.int32), inside, *rel)


def _options(grid, block_size, halo_size, stride=1):
    rank = len(grid)
    if rank > len(_Q):
        raise ValueError(f"halo: grids of rank <= {len(_Q)}, got {grid}")
    block = per_axis("halo.block_size", block_size, rank, minimum=1)
    halo = per_axis("halo.halo_size", halo_size, rank, minimum=0)
    for a, (L, b) in enumerate(zip(grid, block)):
        if L % b:
            raise ValueError(f"halo.block_size: axis {a} of grid {grid} has {L} tokens, not a multiple of the block "
                             f"size {b} (HaloNet blocks the feature map exactly)")
    stride = per_axis("halo.stride", stride, rank, minimum=1)
    for a, (b, s) in enumerate(zip(block, stride)):
        if b % s:
            raise ValueError(f"halo.stride: axis {a} has block size {b}, not a multiple of the stride {s}; timm's "
                             f"HaloAttn then average-pools instead (avg_down): run stride 1 and pool the output with "
                             f"attnx.ops.local.halo.avg_down")
    return block, halo, stride


def _check_rel(rel, block, halo, H):
    if rel is None:
        return None
    rel = tuple(rel) if isinstance(rel, (tuple, list)) else (rel,)
    shapes = tuple((2 * (b + 2 * h) - 1, H) for b, h in zip(block, halo))
    if tuple(tuple(np.shape(r)) for r in rel) != shapes:
        raise ValueError(f"halo.rel: expected one table per grid axis of shapes {shapes} ((2 (b + 2h) - 1, head "
                         f"dim), shared by the heads), got {[tuple(np.shape(r)) for r in rel]}")
    return tuple(jnp.asarray(r, jnp.float32) for r in rel)


def _pad(x, grid, halo):
    """[B, T, K, H] -> [B, prod(grid + 2 halo), K, H] with zero tokens around the map (timm pads the projections)."""
    B, _, K, H = x.shape
    x = jnp.pad(x.reshape(B, *grid, K, H), [(0, 0), *((h, h) for h in halo), (0, 0), (0, 0)])
    return x.reshape(B, -1, K, H)


def _blocked(q, k, v, rel, grid, block, halo, stride, mask_padding, scale):
    query_index, window_index, inside, *rel_index = halo_tables(grid, block, halo, stride)
    B, T, N, H = q.shape
    K = k.shape[2]
    nb, bq = query_index.shape
    wq = window_index.shape[1]
    qb = jnp.take(q.astype(jnp.float32), query_index, axis=1).reshape(B, nb, bq, K, N // K, H)
    keys = jnp.take(_pad(k.astype(jnp.float32), grid, halo), window_index, axis=1)  # [B, nb, wq, K, H]
    values = jnp.take(_pad(v.astype(jnp.float32), grid, halo), window_index, axis=1)
    logits = scale * jnp.einsum("bcqkgh,bcwkh->bcqkgw", qb, keys, precision=HIGHEST)
    if rel is not None:
        rank = len(grid)
        qa = qb.reshape(B, nb, *(b // s for b, s in zip(block, stride)), N, H)
        q_letters, w_letters = _Q[:rank], _W[:rank]
        total = 0.0
        for a, (table, index) in enumerate(zip(rel, rel_index)):
            gathered = table[index]  # [b_a, w_a, H]: the explicit r[row(i, j)] of every (query, window) position
            per_axis_logits = jnp.einsum(f"bc{q_letters}nh,{q_letters[a]}{w_letters[a]}h->bc{q_letters}n{w_letters[a]}",
                                         qa, gathered, precision=HIGHEST)
            shape = [1] * rank
            shape[a] = index.shape[1]
            total = total + per_axis_logits.reshape(*per_axis_logits.shape[:-1], *shape)
        logits = logits + total.reshape(B, nb, bq, K, N // K, wq)
    if mask_padding:  # the block's own tokens are always inside, so no row is fully masked
        logits = jnp.where(inside[None, :, None, None, None, :], logits, -jnp.inf)
    probs = jax.nn.softmax(logits, axis=-1)
    out = jnp.einsum("bcqkgw,bcwkv->bcqkgv", probs, values, precision=HIGHEST).reshape(B, nb * bq, N, -1)
    inverse = np.argsort(query_index.reshape(-1))  # blocks partition the grid: undo the permutation
    return jnp.take(out, inverse, axis=1)


def _reference(q, k, v, rel, grid, block, halo, stride, mask_padding, scale):
    """Dense: every query against every token of the zero-padded map, masked to its block's window."""
    rank = len(grid)
    padded = tuple(L + 2 * h for L, h in zip(grid, halo))
    qc = coordinates(tuple(L // s for L, s in zip(grid, stride))) * np.asarray(stride)  # query pixels, [T, d]
    kc = coordinates(padded) - np.asarray(halo)  # image coordinates of padded positions, [S, d]
    origin = (qc // np.asarray(block)) * np.asarray(block)
    offset = kc[None] - origin[:, None]  # key position inside the block's window, minus h
    allowed = np.all((offset >= -np.asarray(halo)) & (offset < np.asarray(block) + np.asarray(halo)), axis=-1)
    if mask_padding:
        allowed &= np.all((kc >= 0) & (kc < np.asarray(grid)), axis=-1)[None]
    bias = None
    if rel is not None:
        bias = 0.0
        for a in range(rank):
            # timm's row j - i + w - 1, with window position j = key - origin + h and i = (query - origin) / s,
            # the query's index in its subsampled block
            i = (qc[:, a] - origin[:, a]) // stride[a]
            j = kc[None, :, a] - origin[:, a][:, None] + halo[a]
            rows = np.clip(j - i[:, None] + rel[a].shape[0] // 2, 0, rel[a].shape[0] - 1)
            qr = jnp.einsum("btnh,rh->btnr", q.astype(jnp.float32), rel[a], precision=HIGHEST)  # [B, T, N, R]
            picked = qr[:, np.arange(len(qc))[:, None], :, rows]  # [T, S, B, N]
            bias = bias + jnp.transpose(picked, (2, 3, 0, 1))
    return dot_product_attention(q, _pad(k, grid, halo), _pad(v, grid, halo), bias, Mask(dense=jnp.asarray(allowed)),
                                 scale=scale, implementation="reference")


def halo_attention(query, key, value, *, causal: bool = False, grid=None, block_size=8, halo_size=3, rel=None,
                   mask_padding: bool = False, stride=1, scale: float | None = None,
                   implementation: str | None = None):
    """query [*B, T, N, H], key [*B, S, K, H], value [*B, S, K, V] -> [*B, T, N, V]; keys row-major on `grid`.

    grid: (h, w) (or any rank <= 3) of the keys/values; None = a 1-D sequence of length S. block_size b, halo_size
    h: an int or one per axis; every grid axis must be a multiple of its block. rel: the relative embedding tables,
    one per grid axis ([2 (b + 2h) - 1, H] each, shared by the heads; models/layers/mixers/relative_bias.py owns
    them), or None for no relative logits. mask_padding: False (timm parity) lets the zero padding of border windows
    into the softmax; True masks it. stride s (an int or one per axis, each dividing its block): 1 is self
    attention (T = S); s > 1 is timm's strided variant, whose queries are the grid's pixels 0, s, 2s, ... per axis
    (`strided_queries`), T = prod(grid / s), row-major on that subsampled grid, each subsampled block of (b/s)^d
    queries attending to the full-resolution block's window; the output lies on the subsampled grid. (timm's other
    stride-2 form, avg_down, is stride 1 followed by `avg_down`.) scale: default H^-1/2 (on q.k only).
    implementation: "blocked" (default) or "reference".
    """
    if causal:
        raise ValueError("halo: HaloNet attention is non-causal (pattern NS only); got causal=True")
    args = canonicalize(query, key, value)
    B, T, N, H = args.q.shape
    S = args.k.shape[1]
    grid = resolve_grid("halo", grid, S)  # the keys' grid (the queries' too when stride is 1)
    unit = stride == 1 or (isinstance(stride, (tuple, list)) and all(s == 1 for s in stride))
    if unit:
        check_self("halo", T, S)
    block, halo, stride = _options(grid, block_size, halo_size, stride)
    q_grid = tuple(L // s for L, s in zip(grid, stride))
    if T != math.prod(q_grid):
        raise ValueError(f"halo.stride={stride}: the queries lie on the grid {grid} subsampled by the stride, "
                         f"{q_grid} = {math.prod(q_grid)} tokens (see strided_queries), got T={T}")
    rel = _check_rel(rel, block, halo, H)
    scale = H**-0.5 if scale is None else float(scale)
    implementation = implementation or IMPLEMENTATIONS[0]
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"halo.implementation: {implementation!r}; allowed: {IMPLEMENTATIONS} or None")
    path = _reference if implementation == "reference" else _blocked
    out = path(args.q, args.k, args.v, rel, grid, block, halo, stride, bool(mask_padding), scale)
    out = out.astype(args.q.dtype)
    return out.reshape(args.batch_shape + out.shape[1:])


def halo_reference(query, key, value, **kwargs):
    """The dense masked oracle (`implementation="reference"`)."""
    return halo_attention(query, key, value, **{**kwargs, "implementation": "reference"})


def _image(x, grid):
    *batch, T, N, H = x.shape
    if T != math.prod(grid):
        raise ValueError(f"halo: {T} tokens do not fill grid {tuple(grid)} of {math.prod(grid)} tokens")
    return x.reshape(*batch, *grid, N, H), len(batch)


def strided_queries(query, grid, stride=2):
    """[*B, prod(grid), N, H] -> [*B, prod(grid / s), N, H]: the tokens at 0, s, 2s, ... on every axis (row-major),
    what timm's strided 1x1 query convolution (nn.Conv2d(..., 1, stride=s)) reads."""
    grid = tuple(grid)
    stride = per_axis("halo.stride", stride, len(grid), minimum=1)
    image, lead = _image(query, grid)
    image = image[(slice(None),) * lead + tuple(slice(None, None, s) for s in stride)]
    return image.reshape(*query.shape[:lead], -1, *query.shape[-2:])


def avg_down(out, grid):
    """[*B, prod(grid), N, V] -> [*B, prod(grid // 2), N, V]: timm's avg_down, nn.AvgPool2d(2, 2) (floor: an odd
    last row or column is dropped) of a 2-D stride-1 halo attention output, its stride-2 form when the block is not
    a multiple of 2 (or avg_down=True)."""
    grid = tuple(grid)
    if len(grid) != 2:
        raise ValueError(f"halo.avg_down: a 2-D grid (h, w), got {grid}")
    image, lead = _image(out, grid)
    h, w = grid[0] // 2, grid[1] // 2
    image = image[(slice(None),) * lead + (slice(0, 2 * h), slice(0, 2 * w))]
    image = image.reshape(*image.shape[:lead], h, 2, w, 2, *image.shape[-2:])
    pooled = jnp.mean(image.astype(jnp.float32), axis=(lead + 1, lead + 3)).astype(out.dtype)
    return pooled.reshape(*out.shape[:lead], h * w, *out.shape[-2:])
