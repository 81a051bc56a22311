"""Registry entry of Landmark Attention (attnx/ops/landmark/landmark.py): causal self attention only (CAB CS)."""

from attnx.ops.landmark.landmark import IMPLEMENTATIONS, landmark_attention, landmark_decode, landmark_reference_fn
from attnx.registry import AttentionSpec, register_attention

register_attention(AttentionSpec(
    name="landmark",
    fn=landmark_attention,
    reference=landmark_reference_fn,
    patterns=frozenset({"CS"}),
    paper="Mohtashami & Jaggi, 2023, Landmark Attention: Random-Access Infinite Context Length for Transformers, "
          "arXiv 2305.16300, §3 (grouped softmax), §3.2 (top-k block retrieval); code epfml/landmark-attention",
    implementations=IMPLEMENTATIONS,
    # block_size 2 keeps landmarks inside the CAB check's 6 tokens; the paper trains with 50 (configs/attention).
    defaults={"block_size": 2},
    description="landmark tokens gate their blocks through a grouped softmax; top-k blocks retrieved at inference",
    decode=landmark_decode,
))
