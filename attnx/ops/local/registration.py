"""Registry entries of the local (token-grid) family: neighbourhood attention and HaloNet's halo attention.

Both are `spatial`: model layers pass the token grid (`grid=(h, w)`); without one they run on a 1-D sequence. Their
weights (NA's relative positional bias, HaloNet's relative embeddings) live in models/layers/mixers/relative_bias.py.
"""

from attnx.ops.local.halo import IMPLEMENTATIONS as HALO_IMPLEMENTATIONS
from attnx.ops.local.halo import halo_attention, halo_reference
from attnx.ops.local.neighborhood import IMPLEMENTATIONS as NA_IMPLEMENTATIONS
from attnx.ops.local.neighborhood import neighborhood_attention, neighborhood_decode, neighborhood_reference
from attnx.registry import AttentionSpec, register_attention

register_attention(AttentionSpec(
    name="neighborhood",
    fn=neighborhood_attention,
    reference=neighborhood_reference,
    patterns=frozenset({"NS", "CS"}),
    paper="Hassani et al., 2023, Neighborhood Attention Transformer, arXiv 2204.07143, §3.1; Hassani & Shi, 2022, "
          "Dilated Neighborhood Attention Transformer, arXiv 2209.15001, §3; Hassani et al., 2024, Faster "
          "Neighborhood Attention, arXiv 2403.04690, §3 (semantics of SHI-Labs/NATTEN get_na_flex_mask, RPB of "
          "v0.15.1 get_pb_start)",
    implementations=NA_IMPLEMENTATIONS,
    aliases=("natten",),
    defaults={"kernel_size": 3},
    description="each token attends to its k^d grid neighbours (windows shifted inward at borders), with dilation, "
                "per-axis causality and relative positional bias (NAT/DiNAT)",
    decode=neighborhood_decode,
    spatial=True,
))

register_attention(AttentionSpec(
    name="halo",
    fn=halo_attention,
    reference=halo_reference,
    patterns=frozenset({"NS"}),
    paper="Vaswani et al., 2021, Scaling Local Self-Attention for Parameter Efficient Visual Backbones, arXiv "
          "2103.12731, §2 (blocked local self-attention with haloing); details of timm's port, "
          "timm/layers/halo_attn.py",
    implementations=HALO_IMPLEMENTATIONS,
    aliases=("halonet",),
    defaults={"block_size": 2, "halo_size": 1},
    description="queries in b x b blocks attend to their (b + 2h)^2 halo window, factorised relative embeddings "
                "(HaloNet)",
    spatial=True,
))
