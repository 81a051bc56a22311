"""TransNeXt aggregated attention (Shi, CVPR 2024, arXiv 2311.17132): pixel-focused local window + pooled tokens
under one softmax, length-scaled cosine logits, query embedding, learnable tokens, continuous position bias."""

from attnx.ops.aggregated.aggregated import (IMPLEMENTATIONS, aggregated_attention, aggregated_reference, cpb_bias,
                                             l2_normalize, pooled_tokens)

__all__ = ["IMPLEMENTATIONS", "aggregated_attention", "aggregated_reference", "cpb_bias", "l2_normalize",
           "pooled_tokens"]
