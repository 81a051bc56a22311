"""Registry entries of the diffusion attention-control mechanisms: `structured_cross` (Structured Diffusion
Guidance), `region_mask` (PrimeComposer RCA) and `isolation` (IR-Diffusion). Each is softmax attention with
extra value/key sets or a logit mask given as keyword arguments; without them each is plain softmax attention."""

from __future__ import annotations

from attnx.api import implementation_names
from attnx.ops.control.isolation import isolation_attention, isolation_reference
from attnx.ops.control.region import region_mask_attention, region_mask_reference
from attnx.ops.control.structured import structured_cross, structured_cross_reference
from attnx.registry import AttentionSpec, register_attention

register_attention(AttentionSpec(
    name="structured_cross",
    fn=structured_cross,
    reference=structured_cross_reference,
    patterns=frozenset({"NC"}),
    paper="Feng et al., 2023, Training-Free Structured Diffusion Guidance for Compositional Text-to-Image "
          "Synthesis, arXiv 2212.05032, §3 (pairing rule of the official multi_qkv, "
          "weixi-feng/Structured-Diffusion-Guidance)",
    implementations=implementation_names(),
    defaults={"mode": "default"},
    description="one prompt attention map applied to several noun-phrase value sets (default mode), or several "
                "key sets over one value set (conjunction mode), averaged",
))

register_attention(AttentionSpec(
    name="region_mask",
    fn=region_mask_attention,
    reference=region_mask_reference,
    patterns=frozenset({"NC"}),
    paper="Wang et al., 2024, PrimeComposer: Faster Progressively Combined Diffusion for Image Composition with "
          "Attention Steering, arXiv 2403.05053, §3 (region-constrained cross-attention; not in the released "
          "code, from the paper)",
    implementations=implementation_names(),
    aliases=("rca",),
    description="cross attention whose subject-word logits are -inf outside the subject's foreground mask",
))

register_attention(AttentionSpec(
    name="isolation",
    fn=isolation_attention,
    reference=isolation_reference,
    patterns=frozenset({"NS", "NC"}),
    paper="IR-Diffusion, 2024, Improving Multi-Subject Consistency in Open-Domain Image Generation with Isolation "
          "and Reposition Attention, arXiv 2411.19261, §3 (no official code; the spec's reading)",
    implementations=implementation_names(),
    description="self attention extended with reference tokens under a block mask over subject ids (subject i sees "
                "only subject i, plus background)",
))
