"""Registry entry of HiLo attention (LITv2). The model layer, with the code's per-branch projections, is
models/layers/mixers/hilo.py (SPATIAL_MIXERS)."""

from attnx.ops.hilo.hilo import IMPLEMENTATIONS, hilo_attention, hilo_reference
from attnx.registry import AttentionSpec, register_attention

register_attention(AttentionSpec(
    name="hilo",
    fn=hilo_attention,
    reference=hilo_reference,
    patterns=frozenset({"NS"}),
    paper="Pan, Cai & Zhuang, 2022, Fast Vision Transformers with HiLo Attention, arXiv 2205.13213, §3.2 (class "
          "HiLo of ziplab/LITv2 classification/models/attentions.py)",
    implementations=IMPLEMENTATIONS,
    defaults={"alpha": 0.9, "window": 2},
    description="heads split into Hi-Fi (s x s window attention) and Lo-Fi (queries against s x s average-pooled "
                "keys/values) groups, concatenated (LITv2)",
    spatial=True,
))
