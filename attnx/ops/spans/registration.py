"""Registry entries `moa_span` (MoA sink + per-head window) and `act` (softmax with ACT calibration)."""

from __future__ import annotations

from attnx.ops.spans.act import act_attention, act_cache_decode, act_cache_init, act_reference
from attnx.ops.spans.moa import sink_window_attention, sink_window_decode, sink_window_reference
from attnx.registry import AttentionSpec, CacheRule, register_attention
from attnx.api import implementation_names

register_attention(AttentionSpec(
    name="moa_span",
    fn=sink_window_attention,
    reference=sink_window_reference,
    patterns=frozenset({"CS"}),
    paper="Fu et al., 2024, MoA: Mixture of Sparse Attention for Automatic Large Language Model Compression, "
          "arXiv 2406.14909, heterogeneous elastic rules (sink + sliding window per head); official code thu-nics/MoA",
    implementations=implementation_names(),
    # spans has no default in the function (it is the plan); these small values serve the CAB checks (N = 4).
    defaults={"spans": (1, 2, 3, 5), "sink": 1},
    description="per-head causal sliding window of span S_h plus the first `sink` tokens (MoA)",
    decode=sink_window_decode,
))

register_attention(AttentionSpec(
    name="act",
    fn=act_attention,
    reference=act_reference,
    patterns=frozenset({"CS"}),
    paper="Yu et al., 2024, Unveiling and Harnessing Hidden Attention Sinks: Training-Free Attention Calibration "
          "for Large Language Models, arXiv 2406.15765, the attention calibration technique (ACT) section; "
          "official code GATECH-EIC/ACT",
    implementations=("epilogue", "reference"),
    defaults={"beta": 0.4, "tau": 0.1, "statistics": "prefix"},
    description="causal softmax attention with attention-sink calibration on selected heads (materialised)",
    # decoding keeps a running column sum per query head beside the KV cache (prefix statistics, head_mask given)
    cache=CacheRule(init=act_cache_init, decode=act_cache_decode),
))
