"""Registry entry of the Conditional Cross-Attention Network's attention core (attnx/ops/conditional/conditional.py)."""

from attnx.ops.conditional.conditional import conditional_cross, conditional_cross_reference
from attnx.registry import AttentionSpec, register_attention

register_attention(AttentionSpec(
    name="conditional_cross",
    fn=conditional_cross,
    reference=conditional_cross_reference,
    patterns=frozenset({"NC"}),
    paper="Song et al., 2023, Conditional Cross Attention Network for Multi-Space Embedding without Entanglement in "
          "Only a SINGLE Network, arXiv 2307.13254, §3 (no official code; Q/KV assignment per the spec, unverified)",
    implementations=("softmax's",),
    description="attribute-condition tokens query the image tokens (non-causal cross attention only)",
))
