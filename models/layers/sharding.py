"""Logical axis names -> mesh axes, by the axis letters of ARCHITECTURE §3.

Every parameter's name ends in its axis letters (`query_dnh` is [D, N, H], `gate_up_d2f` is [D, 2, F]), and every
activation the models constrain is named the same way (`"btd"` is the residual stream [B, T, D]). That suffix *is*
the logical-axis annotation: the one rules table (train/sharding.py) maps a letter, qualified by what it names —
`w_d` (a weight's model width), `act_b` (an activation's batch) — to mesh axes. Models only name letters; which mesh
axis a letter lands on is the trainer's decision, passed down with flax's own logical-rules context
(`flax.core.spmd.logical_axis_rules`) next to the mesh of `jax.set_mesh`.

Resolution rules, the same for weights and activations (`partition_spec`):
- a letter with no rule, a digit (`2` in `gate_up_d2f`) or a mesh axis of size 1 is replicated;
- a dimension not divisible by its mesh axes' total size is replicated (a 6-head layer on a 4-way tensor axis still
  runs, unsplit), never padded;
- a mesh axis is used at most once per array: the first letter that claims it keeps it (`fc2_dd` splits only its
  first D).
"""

import re
from typing import Any, Mapping, Sequence

import flax.core.spmd
import jax
from jax.sharding import PartitionSpec as P

# A parameter's name: anything, an underscore, then one letter or digit per axis ("query_dnh", "scale_d").
_SUFFIX = re.compile(r"_([a-z0-9]+)$")


def axis_letters(name: str, ndim: int) -> str | None:
    """The axis letters of a parameter called `name` with `ndim` axes, or None when its name carries none (or
    carries a different number than it has axes, e.g. a name that merely ends in a word). An array with exactly
    one more axis than letters is a stack of layers (scan over layers): its leading axis gets the letter `l`."""
    match = _SUFFIX.search(name)
    if match is None:
        return None
    letters = match.group(1)
    if len(letters) == ndim:
        return letters
    if len(letters) + 1 == ndim:
        return "l" + letters
    return None


def partition_spec(letters: str, shape: Sequence[int], kind: str, rules: Mapping[str, Any],
                   mesh_shape: Mapping[str, int]) -> P:
    """The PartitionSpec of an array of `shape` whose axes are `letters`, under `rules` ({"w_d": "fsdp",
    "act_b": ("data", "fsdp"), ...}) for `kind` "w" (weights) or "act" (activations) on a mesh of `mesh_shape`."""
    used: set[str] = set()
    entries = []
    for letter, size in zip(letters, shape):
        target = rules.get(f"{kind}_{letter}")
        axes = (target,) if isinstance(target, str) else tuple(target or ())
        axes = tuple(axis for axis in axes if mesh_shape.get(axis, 1) > 1 and axis not in used)
        total = 1
        for axis in axes:
            total *= mesh_shape[axis]
        if not axes or size % total:
            entries.append(None)
            continue
        used.update(axes)
        entries.append(axes[0] if len(axes) == 1 else axes)
    return P(*entries)


def constrain(x: jax.Array, letters: str) -> jax.Array:
    """`x` (axes `letters`, e.g. "btd") constrained to the sharding the rules in context give its letters.

    A no-op without a mesh in context (`jax.set_mesh`) or without rules (`flax.core.spmd.logical_axis_rules`), so
    the models run unchanged on one device, in tests and at evaluation. Inside `shard_map` (ring attention's per-
    device code) the axes are manual and nothing is constrained.
    """
    if x.ndim != len(letters):
        raise ValueError(f"constrain: {len(letters)} letters {letters!r} for an array of shape {x.shape}")
    rules = flax.core.spmd.get_logical_axis_rules()
    mesh = jax.sharding.get_abstract_mesh()
    if not rules or mesh.empty or any(kind != jax.sharding.AxisType.Auto for kind in mesh.axis_types):
        return x
    spec = partition_spec(letters, x.shape, "act", dict(rules), dict(mesh.shape))
    return jax.lax.with_sharding_constraint(x, spec)
