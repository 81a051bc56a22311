"""`Mask`: one frozen pytree that describes which (query, key) pairs may attend.

Static fields (part of the tree structure, so changing them recompiles):
    causal        query at position p attends to keys j <= p.
    window        (left, right): query at position p attends to keys in [p - left, p + right]; None on a side
                  means unbounded on that side. With `causal=True` the right side is clipped to 0.
    q_offset      the position of query row t is t + q_offset (keys are at positions 0..S-1). 0 aligns the causal
                  diagonal top-left, like `jax.nn.dot_product_attention(is_causal=True)`; S - T aligns it
                  bottom-right (queries are the last T positions, e.g. a chunk of new tokens after a KV cache).
    block_size    (block_q, block_kv) of `block_mask`.

Array fields (leaves; each may carry any leading batch dims that broadcast to the query's batch dims):
    q_segment_ids  [*B, T] int, kv_segment_ids [*B, S] int: packed sequences; attend only within equal ids.
                   Give both or neither.
    q_lengths      [*B] int: query rows t >= q_lengths are padding and return 0.
    kv_lengths     [*B] int: keys s >= kv_lengths are padding.
    block_mask     [..., ceil(T/bq), ceil(S/bk)] bool, broadcastable to [*B, N, nT, nS]: block (i, j) covers queries
                   [i*bq, (i+1)*bq) and keys [j*bk, (j+1)*bk). Fast paths skip blocks that are False everywhere.
    dense          [..., T, S] bool broadcastable to [*B, N, T, S].

Semantics: a pair (t, s) attends iff every present component allows it. A query row with no allowed key returns 0
(and log-sum-exp -inf), in every implementation.

Worked examples::

    Mask(causal=True)                              # GPT-style decoder
    Mask(window=(127, 0), causal=True)             # causal sliding window of 128 keys (Mistral, CAB local CS)
    Mask(window=(64, 64))                          # bidirectional local window (CAB local NS)
    Mask(causal=True, q_offset=S - T)              # T new tokens appended after S - T cached ones
    Mask(q_segment_ids=seg, kv_segment_ids=seg, causal=True)   # packed documents, causal within each
    Mask(kv_lengths=jnp.array([5, 7]))             # right-padded batch
    Mask(block_mask=bm, block_size=(64, 64))       # block-sparse pattern (e.g. SeerAttention's gate output)
    Mask(causal=True) & Mask(kv_lengths=lens)      # components combine with `&`
    Mask(causal=True).materialize(4, 4)            # [1, 1, 4, 4] lower-triangular bool array
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["Mask"]

_ARRAY_FIELDS = ("q_segment_ids", "kv_segment_ids", "q_lengths", "kv_lengths", "block_mask", "dense")
_STATIC_FIELDS = ("causal", "window", "q_offset", "block_size")


def _check_window(window: Any) -> tuple[int | None, int | None] | None:
    if window is None:
        return None
    if isinstance(window, (int, np.integer)) and not isinstance(window, bool):
        window = (int(window), int(window))
    if not (isinstance(window, (tuple, list)) and len(window) == 2):
        raise ValueError(
            f"mask.window: expected None, an int or a pair (left, right) of ints/None, got {window!r}")
    out = []
    for side, w in zip(("left", "right"), window):
        if w is None:
            out.append(None)
            continue
        if isinstance(w, bool) or not isinstance(w, (int, np.integer)):
            raise TypeError(f"mask.window: the {side} size must be an int >= 0 or None, got {w!r}")
        if w < 0:
            raise ValueError(f"mask.window: the {side} size must be >= 0, got {int(w)}")
        out.append(int(w))
    return (out[0], out[1])


@jax.tree_util.register_pytree_node_class
@dataclasses.dataclass(frozen=True, eq=False)
class Mask:
    """Which (query, key) pairs may attend; see the module docstring for every field and worked examples."""

    causal: bool = False
    window: tuple[int | None, int | None] | None = None
    q_offset: int = 0
    block_size: tuple[int, int] | None = None
    q_segment_ids: Any = None
    kv_segment_ids: Any = None
    q_lengths: Any = None
    kv_lengths: Any = None
    block_mask: Any = None
    dense: Any = None

    def __post_init__(self):
        if not isinstance(self.causal, (bool, np.bool_)):
            raise TypeError(f"mask.causal: expected a Python bool, got {self.causal!r}")
        object.__setattr__(self, "causal", bool(self.causal))
        object.__setattr__(self, "window", _check_window(self.window))
        if isinstance(self.q_offset, bool) or not isinstance(self.q_offset, (int, np.integer)):
            raise TypeError(f"mask.q_offset: expected a static int, got {self.q_offset!r}")
        object.__setattr__(self, "q_offset", int(self.q_offset))
        if (self.block_mask is None) != (self.block_size is None):
            raise ValueError("mask.block_size: give block_size=(block_q, block_kv) exactly when block_mask is set, "
                             f"got block_size={self.block_size!r} with block_mask "
                             f"{'set' if self.block_mask is not None else 'None'}")
        if self.block_size is not None:
            bs = self.block_size
            if not (isinstance(bs, (tuple, list)) and len(bs) == 2
                    and all(isinstance(b, (int, np.integer)) and not isinstance(b, bool) and b > 0 for b in bs)):
                raise ValueError(f"mask.block_size: expected a pair of positive ints, got {bs!r}")
            object.__setattr__(self, "block_size", (int(bs[0]), int(bs[1])))
        if (self.q_segment_ids is None) != (self.kv_segment_ids is None):
            raise ValueError("mask.q_segment_ids / mask.kv_segment_ids: give both or neither (for self attention "
                             "pass the same array twice)")

    # ---- pytree -------------------------------------------------------------------------------------------------
    def tree_flatten(self):
        children = tuple(getattr(self, f) for f in _ARRAY_FIELDS)
        aux = tuple(getattr(self, f) for f in _STATIC_FIELDS)
        return children, aux

    @classmethod
    def tree_unflatten(cls, aux, children):
        obj = object.__new__(cls)
        for f, v in zip(_STATIC_FIELDS, aux):
            object.__setattr__(obj, f, v)
        for f, v in zip(_ARRAY_FIELDS, children):
            object.__setattr__(obj, f, v)
        return obj

    def replace(self, **changes) -> "Mask":
        return dataclasses.replace(self, **changes)

    # ---- combination --------------------------------------------------------------------------------------------
    @property
    def effective_window(self) -> tuple[int | None, int | None]:
        """(left, right) after folding `causal` in; None = unbounded."""
        left, right = self.window if self.window is not None else (None, None)
        if self.causal:
            right = 0 if right is None else min(right, 0)
        return left, right

    @property
    def has_array_fields(self) -> bool:
        """True when any data-dependent component (ids, lengths, block mask, dense mask) is present."""
        return any(getattr(self, f) is not None for f in _ARRAY_FIELDS)

    @property
    def is_empty(self) -> bool:
        """True when the mask allows every pair (nothing to apply)."""
        return not self.causal and self.window is None and not self.has_array_fields

    def __and__(self, other: "Mask") -> "Mask":
        if not isinstance(other, Mask):
            return NotImplemented
        if self.q_offset != other.q_offset and (self.causal or self.window) and (other.causal or other.window):
            raise ValueError(f"mask &: both masks place the diagonal but with different q_offset "
                             f"({self.q_offset} vs {other.q_offset})")
        q_offset = self.q_offset if (self.causal or self.window is not None) else other.q_offset

        def min_side(a, b):
            if a is None:
                return b
            if b is None:
                return a
            return min(a, b)

        if self.window is None or other.window is None:
            window = self.window if other.window is None else other.window
        else:
            window = (min_side(self.window[0], other.window[0]), min_side(self.window[1], other.window[1]))
        if self.q_segment_ids is not None and other.q_segment_ids is not None:
            raise ValueError("mask &: both masks carry segment ids; combine them into one pair of id arrays first "
                             "(e.g. ids_a * (max(ids_b) + 1) + ids_b)")

        def both(a, b, op):
            if a is None:
                return b
            if b is None:
                return a
            return op(a, b)

        if self.block_mask is not None and other.block_mask is not None and self.block_size != other.block_size:
            raise ValueError(f"mask &: block masks of different block sizes ({self.block_size} vs "
                             f"{other.block_size}) cannot be combined; convert one to the other's block size")
        return Mask(
            causal=self.causal or other.causal,
            window=window,
            q_offset=q_offset,
            block_size=self.block_size or other.block_size,
            q_segment_ids=both(self.q_segment_ids, other.q_segment_ids, None),
            kv_segment_ids=both(self.kv_segment_ids, other.kv_segment_ids, None),
            q_lengths=both(self.q_lengths, other.q_lengths, jnp.minimum),
            kv_lengths=both(self.kv_lengths, other.kv_lengths, jnp.minimum),
            block_mask=both(self.block_mask, other.block_mask, jnp.logical_and),
            dense=both(self.dense, other.dense, jnp.logical_and),
        )

    # ---- materialisation ----------------------------------------------------------------------------------------
    def materialize(self, T: int, S: int) -> jax.Array:
        """The dense boolean mask, broadcastable to [*B, N, T, S] (size-1 axes where a component does not vary).

        The result has ndim = 2 + max(2, 1 + batch rank of the array fields), i.e. [*B|1, N|1, T, S].
        """
        q_idx = jnp.arange(T)[:, None]
        kv_idx = jnp.arange(S)[None, :]
        return self.evaluate(q_idx, kv_idx)

    def evaluate(self, q_idx: jax.Array, kv_idx: jax.Array) -> jax.Array:
        """The mask at query rows `q_idx` [tq, 1] and key columns `kv_idx` [1, sk] (absolute indices), as a bool
        array [*B|1, N|1, tq, sk]. Fast paths call this on one block at a time; `materialize` on the whole grid."""
        allowed = jnp.ones((q_idx.shape[0], kv_idx.shape[1]), dtype=bool)[None, None]
        left, right = self.effective_window
        pos = q_idx + self.q_offset
        if left is not None:
            allowed = allowed & (kv_idx >= pos - left)[None, None]
        if right is not None:
            allowed = allowed & (kv_idx <= pos + right)[None, None]
        if self.kv_lengths is not None:
            lens = jnp.asarray(self.kv_lengths)
            allowed = allowed & (kv_idx < lens[..., None, None, None])
        if self.q_lengths is not None:
            lens = jnp.asarray(self.q_lengths)
            allowed = allowed & (q_idx < lens[..., None, None, None])
        if self.q_segment_ids is not None:
            qs = jnp.take(jnp.asarray(self.q_segment_ids), q_idx[:, 0], axis=-1)  # [*B, tq]
            ks = jnp.take(jnp.asarray(self.kv_segment_ids), kv_idx[0, :], axis=-1)  # [*B, sk]
            allowed = allowed & (qs[..., None, :, None] == ks[..., None, None, :])
        if self.block_mask is not None:
            bq, bk = self.block_size
            bm = jnp.asarray(self.block_mask)
            rows = jnp.take(bm, jnp.minimum(q_idx[:, 0] // bq, bm.shape[-2] - 1), axis=-2)
            blk = jnp.take(rows, jnp.minimum(kv_idx[0, :] // bk, bm.shape[-1] - 1), axis=-1)
            blk = blk.reshape((1,) * max(0, 4 - blk.ndim) + blk.shape)
            allowed = allowed & blk
        if self.dense is not None:
            d = jnp.asarray(self.dense)
            d = d.reshape((1,) * max(0, 4 - d.ndim) + d.shape)
            d = jnp.take(d, q_idx[:, 0], axis=-2) if d.shape[-2] != 1 else d
            d = jnp.take(d, kv_idx[0, :], axis=-1)
            allowed = allowed & d
        return allowed

    def __repr__(self) -> str:
        parts = []
        if self.causal:
            parts.append("causal=True")
        if self.window is not None:
            parts.append(f"window={self.window}")
        if self.q_offset:
            parts.append(f"q_offset={self.q_offset}")
        for f in _ARRAY_FIELDS:
            v = getattr(self, f)
            if v is not None:
                parts.append(f"{f}={getattr(v, 'dtype', type(v).__name__)}{list(np.shape(v))}")
        if self.block_size is not None:
            parts.append(f"block_size={self.block_size}")
        return f"Mask({', '.join(parts)})"
