"""Ring attention: exact softmax attention with the sequence split over a mesh axis.

Liu, Zaharia & Abbeel, 2023, "Ring Attention with Blockwise Transformers for Near-Infinite Context", arXiv
2310.01889, §3 (Alg. 1): each of the n devices of the ring holds one chunk of the queries and one of the keys and
values; in n steps every device attends its query chunk to the key/value chunk it holds, then passes that chunk to
its neighbour (`lax.ppermute`), so keys and values travel once around the ring and no device ever holds more than
two chunks. Partial results are merged with their log-sum-exp (the flash-attention rescaling, Dao 2023, arXiv
2307.08691, §3.1):

    lse = logaddexp(lse_a, lse_b),   out = out_a exp(lse_a - lse) + out_b exp(lse_b - lse)

each partial coming from `attnx.dot_product_attention_with_lse` (any implementation: chunked on CPU, the Pallas
kernels on accelerators). Causal: with equal chunks in sequence order, device i's queries see chunk j fully when
j < i, causally when j = i, and not at all when j > i; the last case is skipped (`lax.switch`, no attention
computed), which is the blockwise-causal saving of the paper (no load balancing: devices late in the sequence do
more work; striped/zig-zag layouts are not implemented). Gradients come from JAX's autodiff: the transpose of a
`ppermute` is the reverse `ppermute`, so the backward pass runs the ring the other way, and each partial's backward
is its implementation's own (with the gradient through lse).

`ring_attention` takes global arrays and a mesh and runs `jax.shard_map` over them (sequence split over
`axis_name`, the batch over `batch_axes`); `ring_attention_local` is the per-device body, for code already inside
a `shard_map` over the ring's axis.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import Mesh, PartitionSpec as P

from attnx.api import dot_product_attention, dot_product_attention_with_lse
from attnx.mask import Mask
from attnx.ops.softmax.common import match_varying


def _merge(out_a, lse_a, out_b, lse_b):
    """Two partial softmax results over disjoint key sets -> their union's (out [B, T, N, V], lse [B, T, N]).
    A side whose lse is -inf (no visible key) contributes nothing; both -inf gives 0 output and -inf lse."""
    lse = jnp.logaddexp(lse_a, lse_b)
    safe = jnp.where(jnp.isfinite(lse), lse, 0.0)
    weight = lambda part: jnp.where(jnp.isfinite(part), jnp.exp(part - safe), 0.0)[..., None]
    out = out_a.astype(jnp.float32) * weight(lse_a) + out_b.astype(jnp.float32) * weight(lse_b)
    return out, lse


def ring_attention_local(query, key, value, *, axis_name: str, causal: bool = False, scale: float | None = None,
                         implementation=None):
    """Per-device ring attention inside a `shard_map` over `axis_name`: query [B, T_c, N, H], key [B, S_c, K, H],
    value [B, S_c, K, V] are this device's chunks (chunk index = the device's position on the axis, in sequence
    order) -> this device's output chunk [B, T_c, N, V] (float32 accumulation, the query's dtype)."""
    n = lax.axis_size(axis_name)
    me = lax.axis_index(axis_name)
    B, T, N, _ = query.shape
    if causal and key.shape[1] != T:
        raise ValueError(f"ring_attention: causal ring attention needs equal query and key chunks (self attention), "
                         f"got {T} queries and {key.shape[1]} keys per device")
    V = value.shape[-1]

    def attend(mask):
        def run(k, v):
            out, lse = dot_product_attention_with_lse(query, k, v, mask=mask, scale=scale,
                                                      implementation=implementation)
            return out.astype(jnp.float32), lse
        return run

    def skip(k, v):  # a chunk wholly in this device's future: nothing visible (typed like the others' results)
        return (match_varying(jnp.zeros((B, T, N, V), jnp.float32), query, key, value),
                match_varying(jnp.full((B, T, N), -jnp.inf, jnp.float32), query, key, value))

    branches = [attend(None)] if not causal else [attend(None), attend(Mask(causal=True)), skip]

    ring = [(d, (d + 1) % n) for d in range(n)]

    def step(s, carry):
        """Receive the next chunk (the one that started on device me - s, in this device's past when s <= me),
        attend to it and merge: n - 1 passes after the device's own chunk, so no chunk travels further."""
        out, lse, k, v = carry
        k, v = lax.ppermute(k, axis_name, ring), lax.ppermute(v, axis_name, ring)
        case = 0 if not causal else jnp.where(s <= me, 0, 2)  # past chunk: all visible; future: skipped
        part_out, part_lse = lax.switch(case, branches, k, v)
        out, lse = _merge(out, lse, part_out, part_lse)
        return out, lse, k, v

    own_out, own_lse = (branches[1] if causal else branches[0])(key, value)  # the diagonal chunk first
    out, _, _, _ = lax.fori_loop(1, n, step, (own_out, own_lse, key, value))
    return out.astype(query.dtype)


def ring_attention(query, key, value, *, mesh: Mesh, axis_name: str = "sequence", batch_axes=None,
                   head_axis: str | None = None, causal: bool = False, scale: float | None = None,
                   implementation=None):
    """Exact attention of global query [B, T, N, H], key [B, S, K, H], value [B, S, K, V] with T and S split
    over mesh axis `axis_name` (each divisible by its size), B over `batch_axes` (a mesh axis name, a tuple
    of them, or None: replicated) and the heads over `head_axis` (tensor parallelism; None: replicated) ->
    [B, T, N, V], sharded like the query. Equals `attnx.dot_product_attention(..., mask=Mask(causal=causal))`
    (tests/attnx/test_ring.py).

    Splitting heads needs N and K divisible by the axis size: query head n reads key/value head n // (N / K), so
    contiguous slices of N / size query heads and K / size key/value heads stay together on a device."""
    if axis_name not in mesh.axis_names:
        raise ValueError(f"ring_attention.axis_name: {axis_name!r} is not an axis of the mesh {mesh.axis_names}")
    size = mesh.shape[axis_name]
    for name, x in (("query", query), ("key", key), ("value", value)):
        if x.ndim != 4:
            raise ValueError(f"ring_attention.{name}: expected [B, L, heads, head_dim], got shape {x.shape}")
        if x.shape[1] % size:
            raise ValueError(f"ring_attention.{name}: length {x.shape[1]} is not divisible by the {size} devices "
                             f"of mesh axis {axis_name!r}; pad the sequence to a multiple of {size}")
    if head_axis is not None:
        if head_axis not in mesh.axis_names or head_axis == axis_name:
            raise ValueError(f"ring_attention.head_axis: {head_axis!r} must be an axis of the mesh "
                             f"{mesh.axis_names} other than axis_name {axis_name!r}")
        heads = mesh.shape[head_axis]
        if query.shape[2] % heads or key.shape[2] % heads:
            raise ValueError(f"ring_attention.head_axis: {query.shape[2]} query and {key.shape[2]} key/value heads "
                             f"must both be divisible by the {heads} devices of mesh axis {head_axis!r}")
    spec = P(batch_axes, axis_name, head_axis)
    body = lambda q, k, v: ring_attention_local(q, k, v, axis_name=axis_name, causal=causal, scale=scale,
                                                implementation=implementation)
    return jax.shard_map(body, mesh=mesh, in_specs=(spec, spec, spec), out_specs=spec)(query, key, value)


def ring_mechanism(query, key, value, *, causal: bool = False, axis_name: str = "sequence", scale=None,
                   implementation=None):
    """The registry form (`ring`): softmax attention that runs as ring attention over mesh axis `axis_name` of
    the mesh in context (`jax.set_mesh(mesh)` around the jitted step), with the batch over the mesh's `data` and
    `fsdp` axes; without such a mesh (or with the axis of size 1) it is plain `dot_product_attention`, so a model
    configured with it runs unchanged on one device."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or axis_name not in mesh.axis_names or mesh.shape[axis_name] == 1:
        return dot_product_attention(query, key, value, mask=Mask(causal=causal), scale=scale,
                                     implementation=implementation)
    batch = tuple(name for name in ("data", "fsdp") if name in mesh.axis_names and mesh.shape[name] > 1)
    # Heads stay split over the tensor axis (as the layer's projections left them) when both counts divide it.
    tensor = mesh.shape.get("tensor", 1)
    head_axis = "tensor" if tensor > 1 and not query.shape[2] % tensor and not key.shape[2] % tensor else None
    return ring_attention(query, key, value, mesh=mesh, axis_name=axis_name, batch_axes=batch or None,
                          head_axis=head_axis, causal=causal, scale=scale, implementation=implementation)


def ring_reference(query, key, value, *, causal: bool = False, scale=None, **unused):
    return dot_product_attention(query, key, value, mask=Mask(causal=causal), scale=scale, implementation="reference")
