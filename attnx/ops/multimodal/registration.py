"""Registry entries of the multimodal masks and head transforms (spec diffusion_multimodal_bench.md §7). All are
causal self attention (CAB pattern CS) over a sequence with a fixed image span given as keyword arguments.

Registry defaults: cca and mma declare no image (plain causal), because their image block is non-causal by design
and the CAB prefix check would fail on it; composite, var, vhr and head_modulation keep every row causal, so their
defaults carry a small image span / selection that the CAB check exercises."""

from attnx.api import implementation_names
from attnx.ops.multimodal import attention as mm
from attnx.ops.multimodal import modulation
from attnx.registry import AttentionSpec, CacheRule, register_attention

register_attention(AttentionSpec(
    name="cca",
    fn=mm.cca_attention,
    reference=mm.reference_of(mm.cca_attention),
    patterns=frozenset({"CS"}),
    paper="Xing, Li, Laptev, Lu, 2024, Mitigating Object Hallucination via Concentric Causal Attention, NeurIPS "
          "2024, arXiv 2410.15926, §3.2-3.3, Fig. 3 (code xing0047/cca-llava llava/cca_utils/cca.py)",
    implementations=implementation_names(),
    defaults={},
    description="causal attention whose image block follows concentric rings (ring(k) <= ring(q)); the concentric "
                "rotary positions are cca_position_ids, applied by the layer",
    decode=mm.cca_decode,
    rotary_positions=mm.cca_rotary_positions,
))

register_attention(AttentionSpec(
    name="mma",
    fn=mm.mma_attention,
    reference=mm.reference_of(mm.mma_attention),
    patterns=frozenset({"CS"}),
    paper="Wang, Wang, Suzuki, Kobayashi, 2025, Seeing is Understanding: Unlocking Causal Attention into "
          "Modality-Mutual Attention for Multimodal LLMs (AKI), arXiv 2503.02597, §3 (code sony/aki "
          "codes/open_flamingo/src/vlm.py::_make_modality_mutual_mask)",
    implementations=implementation_names(),
    defaults={},
    description="modality-mutual attention: causal, plus image tokens see the question (never the answer)",
    decode=mm.mma_decode,
))

register_attention(AttentionSpec(
    name="composite",
    fn=mm.composite_attention,
    reference=mm.reference_of(mm.composite_attention),
    patterns=frozenset({"CS"}),
    paper="Ma et al., 2024, EE-MLLM: A Data-Efficient and Compute-Efficient Multimodal Large Language Model, "
          "arXiv 2408.11795, §3.2 (composite attention; no official code)",
    implementations=implementation_names(),
    aliases=("ee_mllm",),
    defaults={"image_span": (1, 4)},
    description="EE-MLLM composite attention: text rows causal over [visual; text], visual rows see only themselves",
    decode=mm.composite_decode,
))

register_attention(AttentionSpec(
    name="var",
    fn=mm.var_attention,
    reference=mm.var_attention,
    patterns=frozenset({"CS"}),
    paper="Kang, Kim, Kim, Hwang, 2025, See What You Are Told: Visual Attention Sink in Large Multimodal Models, "
          "ICLR 2025, arXiv 2503.03321, §4-5 (code MICV-yonsei/VisAttnSink src/logic/logic.py)",
    implementations=("reference",),
    defaults={"image_span": (1, 4), "sinks": (0, 2)},
    description="visual attention redistribution: post-softmax, sink mass of image-centric heads moves to the "
                "image's non-sink tokens (materialised reference path only)",
    decode=mm.var_decode,
    # the cache keeps each token's sink flag beside its key and value (in-model detection sees new tokens only)
    cache=CacheRule(init=mm.var_cache_init, decode=mm.var_cache_decode),
))

register_attention(AttentionSpec(
    name="vhr",
    fn=mm.vhr_attention,
    reference=mm.reference_of(mm.vhr_attention),
    patterns=frozenset({"CS"}),
    paper="He et al., 2024, Cracking the Code of Hallucination in LVLMs with Vision-aware Head Divergence, "
          "arXiv 2412.13949, ACL 2025, §3-4 (VHD, VHR; code not available here)",
    implementations=implementation_names(),
    defaults={"heads": (0,), "alpha": 2.0},
    description="vision-aware head reinforcement: causal softmax with the selected heads' outputs scaled by alpha",
    decode=mm.vhr_decode,
))

register_attention(AttentionSpec(
    name="head_modulation",
    fn=modulation.head_modulation_attention,
    reference=mm.reference_of(modulation.head_modulation_attention),
    patterns=frozenset({"CS"}),
    paper="Arif, Dip, Hussain, Zhang, Thomas, 2025, Fixing Imbalanced Attention to Mitigate In-Context "
          "Hallucination of Large Vision-Language Model, arXiv 2501.12206, §3 (code hasanar1f/PAINT "
          "modPAI/attention.py, clip_encoder.py; mode='code')",
    implementations=implementation_names(),
    defaults={"tokens": (1, 3), "heads": (0,), "head_scores": (1.0,), "alpha": 1.0},
    description="head-specific logit boost log(1 + alpha s_h) on selected (visual) tokens (mode 'bias'), or the "
                "official code's z + alpha|z| / z + beta|z| on local / summary image tokens (mode 'code', "
                "reference path)",
    decode=modulation.head_modulation_decode,
))
