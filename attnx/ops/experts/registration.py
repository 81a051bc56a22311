"""Registry entry of BAM's soft Mixture of Attention experts (`moa_experts`; `moa_span` is the other MoA). The
router W_A lives in the model (models/layers/mixers/moa_experts.py)."""

from __future__ import annotations

import functools

from attnx.ops.experts.bam import mix_experts, mix_experts_reference
from attnx.registry import AttentionSpec, get_attention, register_attention


def _core(core: str):
    spec = get_attention(core)
    if spec.name == "moa_experts":
        raise ValueError("moa_experts.core: the experts' attention cannot itself be moa_experts")
    return spec


def moa_experts_attention(query, key, value, *, causal: bool = False, gates=None, num_experts: int = 2,
                          kv_shared: bool = False, core: str = "softmax", core_kwargs=None, reference: bool = False):
    """E soft-mixed attention experts as E.N_e heads (attnx.ops.experts.bam): gates [*B, T, E] from the router
    (None: uniform); kv_shared: experts share the key/value heads; core: the experts' attention mechanism."""
    spec = _core(core)
    fn = functools.partial(spec.reference if reference else spec.fn, causal=causal, **dict(core_kwargs or {}))
    mix = mix_experts_reference if reference else mix_experts
    return mix(fn, query, key, value, gates=gates, num_experts=num_experts, kv_shared=kv_shared)


def moa_experts_reference(query, key, value, **kwargs):
    return moa_experts_attention(query, key, value, reference=True, **kwargs)


def moa_experts_decode(query, key_cache, value_cache, *, query_positions, gates=None, num_experts: int = 2,
                       kv_shared: bool = False, core: str = "softmax", core_kwargs=None):
    """The core's decode rule over every expert's heads, then the gates of the decoded tokens."""
    spec = _core(core)
    if spec.decode is None:
        raise NotImplementedError(f"moa_experts: core {core!r} has no KV-cache decode rule")
    fn = functools.partial(spec.decode, query_positions=query_positions, **dict(core_kwargs or {}))
    return mix_experts(fn, query, key_cache, value_cache, gates=gates, num_experts=num_experts, kv_shared=kv_shared)


register_attention(AttentionSpec(
    name="moa_experts",
    fn=moa_experts_attention,
    reference=moa_experts_reference,
    patterns=frozenset({"NS", "CS", "NC", "CC"}),
    paper="Zhang et al., 2024, BAM! Just Like That: Simple and Efficient Parameter Upcycling for Mixture of Experts, "
          "arXiv 2408.08274, §4 (soft Mixture of Attention, full and KV-shared experts); no official code",
    implementations=("core's",),
    aliases=("bam",),
    defaults={"num_experts": 2},
    description="attention experts (E groups of heads) mixed per token by a soft router, full or KV-shared",
    decode=moa_experts_decode,
))
