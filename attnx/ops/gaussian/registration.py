"""Registry entry of GAAM (Gaussian re-weighting of the values, optionally queries and keys, around softmax
attention). The per-head Gaussians delta, c live in the model (models/layers/mixers/gaam.py)."""

from attnx.ops.gaussian.attention import gaam_attention, gaam_attention_reference, gaam_decode
from attnx.registry import AttentionSpec, register_attention

register_attention(AttentionSpec(
    name="gaam",
    fn=gaam_attention,
    reference=gaam_attention_reference,
    patterns=frozenset({"NS", "CS", "NC", "CC"}),
    paper="Ioannides et al., 2024, Gaussian Adaptive Attention is All You Need: Robust Contextual Representations "
          "Across Multiple Modalities, arXiv 2401.11143, §3 (formula of the official code, "
          "gioannides/Gaussian-Adaptive-Attention GaussianBlock.py)",
    implementations=("softmax's",),
    defaults={"num_gaussians": 4},
    description="values (and, with apply_to, queries and keys) re-weighted by stacked GaussianBlocks: products of "
                "learned Gaussians over their normalised statistics (GAAM), then softmax attention",
    decode=gaam_decode,
))
