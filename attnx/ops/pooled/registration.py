"""Registry entry of MQSA (window-pooled queries, long/short branches mixed by alpha)."""

from attnx.ops.pooled.mqsa import mqsa_attention, mqsa_reference
from attnx.registry import AttentionSpec, register_attention

register_attention(AttentionSpec(
    name="mqsa",
    fn=mqsa_attention,
    reference=mqsa_reference,
    patterns=frozenset({"NS", "CS", "NC", "CC"}),
    paper="Zhu et al., 2024, Collaboration and Transition: Distilling Item Transitions into Multi-Query "
          "Self-Attention for Sequential Recommendation, arXiv 2311.01056, method section (no official code; "
          "mean pooling assumed)",
    implementations=("softmax's",),
    defaults={"long_window": 3, "short_window": 1, "alpha": 0.5},
    description="queries mean-pooled over the last L positions; long- and short-window branches mixed by alpha",
))
