"""Registry entry of SeerAttention. The gate's weights live in the model (models/layers/mixers/seer.py); the
registered function runs block-sparse attention from the gate's logits (or a given block mask), dense without."""

from attnx.ops.seer.attention import IMPLEMENTATIONS, seer_attention, seer_decode, seer_reference
from attnx.registry import AttentionSpec, register_attention

register_attention(AttentionSpec(
    name="seer",
    fn=seer_attention,
    reference=seer_reference,
    patterns=frozenset({"NS", "CS"}),
    paper="Gao et al., 2024, SeerAttention: Learning Intrinsic Sparse Attention in Your LLMs, arXiv 2410.13276, "
          "§3.1-3.2 (gate, block-sparse attention, max-pool distillation; official code microsoft/SeerAttention)",
    implementations=IMPLEMENTATIONS,
    description="learned block gate on pooled pre-RoPE q/k selects key blocks; block-sparse softmax on them "
                "(dense when no gate is given)",
    decode=seer_decode,
))
