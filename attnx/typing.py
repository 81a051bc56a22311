"""Array type aliases and the axis-letter glossary used across attnx.

Axis letters (ARCHITECTURE §3), used the same way in einsum strings, annotations, comments and sharding names:

    B batch · T query length · S key/value length · N query heads · K key/value heads · G = N/K group size
    H head dim (q/k) · V value head dim · D model width · F MLP width · P patches · E experts

Annotations are documentation: they are not checked at run time (validation happens once, at the public entry,
see `attnx.validation`).
"""

from __future__ import annotations

from typing import Any, Callable

import jax
from jaxtyping import Array, Bool, Float, Int

__all__ = [
    "Array",
    "Bool",
    "Float",
    "Int",
    "ScoreMod",
    "MaskMod",
    "PRNGKey",
]

PRNGKey = jax.Array

# score_mod(score, batch, head, q_idx, kv_idx) -> score. Every argument is an array that broadcasts against the
# logits block ([B, N, T, S]-like); write it with elementwise jnp ops, as you would write a scalar function.
ScoreMod = Callable[[Any, Any, Any, Any, Any], Any]
# mask_mod(batch, head, q_idx, kv_idx) -> bool array (True = attend), broadcasting like score_mod.
MaskMod = Callable[[Any, Any, Any, Any], Any]
