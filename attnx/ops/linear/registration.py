"""Registry entries of the linear-attention family."""

from attnx.ops.linear.based import IMPLEMENTATIONS as BASED_IMPLEMENTATIONS
from attnx.ops.linear.based import based_attention, based_decode, based_reference_fn
from attnx.ops.linear.performer import IMPLEMENTATIONS as PERFORMER_IMPLEMENTATIONS
from attnx.ops.linear.performer import performer_attention, performer_decode, performer_reference
from attnx.ops.linear.cosformer import IMPLEMENTATIONS as COSFORMER_IMPLEMENTATIONS
from attnx.ops.linear.cosformer import cosformer_attention, cosformer_reference
from attnx.ops.linear.inline import IMPLEMENTATIONS as INLINE_IMPLEMENTATIONS
from attnx.ops.linear.inline import inline_attention, inline_reference
from attnx.ops.linear.lightning import IMPLEMENTATIONS, lightning_attention, lightning_decode, lightning_reference_fn
from attnx.registry import AttentionSpec, register_attention

register_attention(AttentionSpec(
    name="lightning",
    fn=lightning_attention,
    reference=lightning_reference_fn,
    patterns=frozenset({"NS", "CS"}),
    paper="Qin et al., 2024, Various Lengths, Constant Speed: Efficient Language Modeling with Lightning Attention, "
          "arXiv 2405.17381, §3.1 and Algorithm 1; slopes: TransNormerLLM, arXiv 2307.14995, §3.1",
    implementations=IMPLEMENTATIONS,
    aliases=("lightning2",),
    defaults={},
    description="causal linear attention with per-head exponential decay, tiled (Lightning Attention-2)",
    decode=lightning_decode,
))

register_attention(AttentionSpec(
    name="based",
    fn=based_attention,
    reference=based_reference_fn,
    patterns=frozenset({"NS", "CS", "NC"}),
    paper="Arora et al., 2024, Simple linear attention language models balance the recall-throughput tradeoff, "
          "arXiv 2402.18668, §3 (Taylor feature map); Zoology, arXiv 2312.04927",
    implementations=BASED_IMPLEMENTATIONS,
    description="linear attention with the 2nd-order Taylor feature map of exp (Based)",
    decode=based_decode,
))

register_attention(AttentionSpec(
    name="performer",
    fn=performer_attention,
    reference=performer_reference,
    patterns=frozenset({"NS", "CS", "NC"}),
    paper="Choromanski et al., 2021, Rethinking Attention with Performers, arXiv 2009.14794, §2.3-2.4 (FAVOR+); "
          "CAB (arXiv 2210.07661) approx_attn_dim 16",
    implementations=PERFORMER_IMPLEMENTATIONS,
    defaults={"num_features": 16},
    description="softmax kernel approximated by positive orthogonal random features (FAVOR+)",
    decode=performer_decode,
))

register_attention(AttentionSpec(
    name="cosformer",
    fn=cosformer_attention,
    reference=cosformer_reference,
    patterns=frozenset({"NS", "NC"}),
    paper="Qin et al., 2022, cosFormer: Rethinking Softmax in Attention, arXiv 2202.08791, §3.2-3.3; CAB "
          "(arXiv 2210.07661) patterns NS, NC",
    implementations=COSFORMER_IMPLEMENTATIONS,
    description="ReLU linear attention with cos(pi (i - j) / 2M) re-weighting (cosFormer)",
))


register_attention(AttentionSpec(
    name="inline",
    fn=inline_attention,
    reference=inline_reference,
    patterns=frozenset({"NS", "NC"}),
    paper="Han et al., 2024, Bridging the Divide: Reconsidering Softmax and Linear Attention, arXiv 2412.06590, "
          "§4 (injective linear attention, eq. 5) and §5 (local residual); LeapLabTHU/InLine "
          "models/inline_deit.py, inline_swin.py",
    implementations=INLINE_IMPLEMENTATIONS,
    description="injective linear attention: weights c (q.k_j - mean_s q.k_s) + 1/S sum to 1, plus a per-image "
                "dynamic 3x3 depth-wise residual on V (InLine)",
    spatial=True,
))
