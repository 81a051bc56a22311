"""Registry entry of CrossFormer's long short distance attention (attnx/ops/grouped/lsda.py).

The DPB MLP's weights live in the model (models/layers/mixers/crossformer.py), which passes the table as
`position_bias`; the registered function takes it as an explicit array (None: no position bias)."""

from __future__ import annotations

from attnx.ops.grouped.lsda import lsda_attention, lsda_reference
from attnx.registry import AttentionSpec, register_attention

register_attention(AttentionSpec(
    name="lsda",
    fn=lsda_attention,
    reference=lsda_reference,
    patterns=frozenset({"NS"}),
    paper="Wang et al., 2022, CrossFormer: A Versatile Vision Transformer Hinging on Cross-scale Attention, "
          "ICLR 2022, arXiv 2108.00154, §3.2 (LSDA) and §3.3 (DPB); code cheerss/CrossFormer models/crossformer.py",
    implementations=("xla",),
    aliases=("crossformer",),
    defaults={"group_size": 7, "mode": "sda"},
    description="grouped attention on a token grid: adjacent G x G groups (SDA) or groups of tokens spaced I "
                "apart (LDA), padding masked, plus a dynamic position bias table",
    spatial=True,
))
