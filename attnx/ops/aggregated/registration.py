"""Registry entry of TransNeXt's aggregated attention (the weights live in models/layers/mixers/transnext.py)."""

from attnx.ops.aggregated.aggregated import IMPLEMENTATIONS, aggregated_attention, aggregated_reference
from attnx.registry import AttentionSpec, register_attention

register_attention(AttentionSpec(
    name="aggregated",
    fn=aggregated_attention,
    reference=aggregated_reference,
    patterns=frozenset({"NS"}),
    paper="Shi, 2024, TransNeXt: Robust Foveal Visual Perception for Vision Transformers, CVPR 2024, arXiv "
          "2311.17132, §3.1-3.2 (pixel-focused and aggregated attention, length-scaled cosine attention); official "
          "code DaiShiResearch/TransNeXt classification/attention_native.py",
    implementations=IMPLEMENTATIONS,
    aliases=("transnext",),
    defaults={"window": 3},
    description="local zero-padded window + pooled tokens under one softmax, length-scaled cosine logits, query "
                "embedding, learnable tokens, continuous position bias (TransNeXt); window=None: its full stage",
    spatial=True,
))
