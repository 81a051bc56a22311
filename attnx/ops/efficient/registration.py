"""Registry entries of CAB's efficient attentions (patterns as CAB's module headers declare them, except ABC's
causal self form, which attnx computes as the correct prefix memory; see attnx/ops/efficient/abc.py)."""

from attnx.ops.efficient import abc, lara, longshort, nystrom, probsparse
from attnx.registry import AttentionSpec, register_attention

CAB = "CAB (Zhang et al., 2023, arXiv 2210.07661)"

register_attention(AttentionSpec(
    name="nystrom",
    fn=nystrom.nystrom_attention,
    reference=nystrom.nystrom_reference,
    patterns=frozenset({"NS"}),
    paper="Xiong et al., 2021, Nystromformer: A Nystrom-Based Algorithm for Approximating Self-Attention, arXiv "
          f"2102.03902, §3.2-3.3; {CAB} num_landmarks 16",
    implementations=nystrom.IMPLEMENTATIONS,
    aliases=("nystromformer",),
    defaults={"num_landmarks": 16, "num_iterations": 6},
    description="softmax attention through m segment-mean landmarks and an iterative pseudo-inverse",
))

register_attention(AttentionSpec(
    name="abc",
    fn=abc.abc_attention,
    reference=abc.abc_reference,
    patterns=frozenset({"NS", "CS", "NC", "CC"}),
    paper="Peng et al., 2022, ABC: Attention with Bounded-memory Control, arXiv 2110.02488, §3; "
          f"{CAB} num_landmarks 16",
    implementations=abc.IMPLEMENTATIONS,
    defaults={},
    description="attention over n learned memory slots written by a softmax over positions (prefix form when causal)",
    decode=abc.abc_decode,
))

register_attention(AttentionSpec(
    name="lara",
    fn=lara.lara_attention,
    reference=lara.lara_reference,
    patterns=frozenset({"NS"}),
    paper="Zheng et al., 2022, Linear Complexity Randomized Self-attention Mechanism, arXiv 2204.04667, §4; "
          f"{CAB} num_landmarks 16",
    implementations=lara.IMPLEMENTATIONS,
    defaults={"num_landmarks": 16},
    description="random-feature attention with segment-mean proposals and self-normalised importance sampling",
))

register_attention(AttentionSpec(
    name="longshort",
    fn=longshort.longshort_attention,
    reference=longshort.longshort_reference,
    patterns=frozenset({"NS", "CS"}),
    paper="Zhu et al., 2021, Long-Short Transformer: Efficient Transformers for Language and Vision, arXiv "
          f"2107.02192, §3.1-3.4; {CAB}",
    implementations=longshort.IMPLEMENTATIONS,
    aliases=("transformer_ls",),
    defaults={"window": 16, "chunk_size": 16},
    description="one softmax over sliding-window keys and dynamically projected low-rank keys, with DualLN",
    decode=longshort.longshort_decode,
))

register_attention(AttentionSpec(
    name="probsparse",
    fn=probsparse.probsparse_attention,
    reference=probsparse.probsparse_reference,
    patterns=frozenset({"NS"}),
    paper="Zhou et al., 2021, Informer: Beyond Efficient Transformer for Long Sequence Time-Series Forecasting, "
          f"arXiv 2012.07436, §3.1; {CAB} factor 5",
    implementations=probsparse.IMPLEMENTATIONS,
    aliases=("informer",),
    defaults={"factor": 5},
    description="full attention for the top-u queries by a sampled sparsity measure, mean(V) for the rest",
))
