"""Registry entry of DARE (logits from the attention stream, values from the representation stream)."""

from attnx.ops.decoupled.dare import dare_attention, dare_decode, dare_reference
from attnx.registry import AttentionSpec, register_attention

register_attention(AttentionSpec(
    name="dare",
    fn=dare_attention,
    reference=dare_reference,
    patterns=frozenset({"NS", "CS", "NC", "CC"}),
    paper="Feng et al., 2024, Long-Sequence Recommendation Models Need Decoupled Embeddings, arXiv 2410.02604, §3-§4 "
          "(score and search of the official code, thuml/DARE model/attention_pytorch.py, din_pytorch.py)",
    implementations=("softmax's",),
    defaults={},
    description="attention whose logits and values come from separate embeddings; split semantic/time score, "
                "optional top-k search",
    decode=dare_decode,
))
