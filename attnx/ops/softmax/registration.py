"""Registry entries of the softmax family beyond the builtin `softmax` (attnx/ops/builtin.py): ring attention."""

from attnx.api import implementation_names
from attnx.ops.builtin import softmax_decode
from attnx.ops.softmax.ring import ring_mechanism, ring_reference
from attnx.registry import AttentionSpec, register_attention

register_attention(AttentionSpec(
    name="ring",
    fn=ring_mechanism,
    reference=ring_reference,
    patterns=frozenset({"NS", "CS", "NC", "CC"}),
    paper="Liu, Zaharia & Abbeel, 2023, Ring Attention with Blockwise Transformers for Near-Infinite Context, arXiv "
          "2310.01889, §3 (Alg. 1)",
    implementations=implementation_names(),
    aliases=("ring_attention",),
    description="exact softmax attention with the sequence split over the `sequence` axis of the mesh in context "
                "(keys and values passed around the ring, partials merged by log-sum-exp); plain attention "
                "without one",
    decode=softmax_decode,
))
