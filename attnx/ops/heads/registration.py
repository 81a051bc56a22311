"""Registry entries of the head-level mechanisms: MoH and Sigma's DiffQKV (attnx/ops/heads/diffqkv.py).

MoH: The router weights live in the model (models/layers/mixers/moh.py); the registered
function applies given gates to any core mechanism, or computes the parameter-free gates from the queries."""

from __future__ import annotations

from attnx.api import implementation_names
from attnx.ops.heads.diffqkv import flexhead_attention, flexhead_decode, flexhead_reference
from attnx.ops.heads.moh import apply_head_gates, moh_param_free_gates
from attnx.registry import AttentionSpec, get_attention, register_attention


def _core(core: str):
    spec = get_attention(core)
    if spec.name == "moh":
        raise ValueError("moh.core: MoH gates heads of another mechanism; core='moh' is circular")
    return spec


def _gates(query, gates, n_shared, top_k, param_free):
    if gates is None and param_free:
        return moh_param_free_gates(query, n_shared=n_shared, top_k=top_k)
    return gates


def _layout(spec, grid) -> dict:
    """`grid=` for a spatial core; a layout given to a core that has none is an error, not silently dropped."""
    if grid is None:
        return {}
    if not spec.spatial:
        raise ValueError(f"moh: grid={grid!r} was given but the core {spec.name!r} does not read a token layout")
    return {"grid": grid}


def moh_attention(query, key, value, *, causal: bool = False, gates=None, n_shared: int = 0, top_k: int = 0,
                  param_free: bool = False, balance_weight: float = 0.01, core: str = "softmax",
                  core_kwargs=None, reference: bool = False, grid=None):
    """The `core` mechanism's output [*B, T, N, V] scaled per head by `gates` [*B, T, N] (MoH, arXiv 2410.11842).

    gates: from a router (models/layers/mixers/moh.py); None with param_free=True derives binary gates from the
    queries; None otherwise leaves every head on (plain `core`). n_shared, top_k and balance_weight configure the
    router and are accepted here so that one attention_kwargs dict serves the layer and the function. grid: the
    token layout, passed on to a spatial core (e.g. neighbourhood attention in a ViT).
    """
    del balance_weight
    spec = _core(core)
    fn = spec.reference if reference else spec.fn
    out = fn(query, key, value, causal=causal, **_layout(spec, grid), **dict(core_kwargs or {}))
    gates = _gates(query, gates, n_shared, top_k, param_free)
    return out if gates is None else apply_head_gates(out, gates)


def moh_reference(query, key, value, **kwargs):
    return moh_attention(query, key, value, reference=True, **kwargs)


def moh_decode(query, key_cache, value_cache, *, query_positions, gates=None, n_shared: int = 0, top_k: int = 0,
               param_free: bool = False, balance_weight: float = 0.01, core: str = "softmax", core_kwargs=None,
               grid=None):
    """The core's decode rule, then the gates of the decoded tokens."""
    del balance_weight
    spec = _core(core)
    if spec.decode is None:
        raise NotImplementedError(f"moh: core {core!r} has no KV-cache decode rule")
    out = spec.decode(query, key_cache, value_cache, query_positions=query_positions, **_layout(spec, grid),
                      **dict(core_kwargs or {}))
    gates = _gates(query, gates, n_shared, top_k, param_free)
    return out if gates is None else apply_head_gates(out, gates)


register_attention(AttentionSpec(
    name="moh",
    fn=moh_attention,
    reference=moh_reference,
    patterns=frozenset({"NS", "CS", "NC", "CC"}),
    paper="Jin et al., 2024, MoH: Multi-Head Attention as Mixture-of-Head Attention, arXiv 2410.11842, §3.2 "
          "(gate scaling of the official code, SkyworkAI/MoH MoH-DiT/models.py)",
    implementations=("core's",),
    defaults={"core": "softmax"},
    description="per-token head gates (shared + top-k routed heads) around any core mechanism",
    decode=moh_decode,
))


register_attention(AttentionSpec(
    name="diffqkv",
    fn=flexhead_attention,
    reference=flexhead_reference,
    patterns=frozenset({"NS", "CS", "NC", "CC"}),
    paper="Lin et al., 2025, Sigma: Differential Rescaling of Query, Key and Value for Efficient Language Models, "
          "arXiv 2501.13629, §2 (DiffQKV: independent K and V head counts, augmented Q)",
    implementations=implementation_names(),
    aliases=("sigma",),
    description="softmax attention whose key and value heads are counted (and cached) independently",
    decode=flexhead_decode,
))
