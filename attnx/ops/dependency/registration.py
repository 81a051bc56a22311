"""Registry entry of DependencyViT's reversed attention (attnx/ops/dependency/reversed.py). The head selector and
message controller weights live in the model (models/layers/mixers/dependency.py); without them the gates are 1."""

from attnx.ops.dependency.reversed import reversed_attention, reversed_reference
from attnx.registry import AttentionSpec, register_attention

register_attention(AttentionSpec(
    name="reversed",
    fn=reversed_attention,
    reference=reversed_reference,
    patterns=frozenset({"NS"}),
    paper="Ding et al., 2023, Visual Dependency Transformers: Dependency Tree Emerges from Reversed Attention, "
          "arXiv 2304.03282, §3 (no official code; head selector / message controller as in the timm WIP port)",
    implementations=("chunked over children", "reference"),
    aliases=("dependencyvit",),
    description="transposed softmax: children send head-selected, message-gated values to the parents they attend "
                "to (non-causal self attention only)",
))
