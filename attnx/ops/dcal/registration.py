"""Registry entries of DCAL's two cross attentions (attnx/ops/dcal/dcal.py). Both are non-causal; they run on self
(NS) and cross (NC) inputs alike."""

from attnx.ops.dcal.dcal import glca_attention, glca_reference, pwca_attention, pwca_reference
from attnx.registry import AttentionSpec, register_attention

PAPER = ("Zhu et al., 2022, Dual Cross-Attention Learning for Fine-Grained Visual Categorization and Object "
         "Re-Identification, arXiv 2205.02151")

register_attention(AttentionSpec(
    name="glca",
    fn=glca_attention,
    reference=glca_reference,
    patterns=frozenset({"NS", "NC"}),
    paper=f"{PAPER}, §3.2 (global-local cross attention; no official code)",
    implementations=("softmax's",),
    defaults={"ratio": 1.0},
    description="the top-R query rows by a score (the class token's attention rollout) attend over all keys; other "
                "rows are zero",
))

register_attention(AttentionSpec(
    name="pwca",
    fn=pwca_attention,
    reference=pwca_reference,
    patterns=frozenset({"NS", "NC"}),
    paper=f"{PAPER}, §3.3 (pair-wise cross attention, training only; no official code)",
    implementations=("softmax's",),
    defaults={"pair_shift": 1},
    description="queries attend over their own keys/values concatenated with a distractor image's (by default the "
                "next sample in the batch), one joint softmax",
))
