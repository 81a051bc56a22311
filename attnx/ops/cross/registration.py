"""Registry entry of decoupled multi-stream cross-attention (attnx/ops/cross/multi_stream.py): `ip_adapter`.

The image projection and the to_k_ip / to_v_ip weights live in the model (models/layers/ip_adapter.py); the
registered function takes the projected streams."""

from __future__ import annotations

from attnx.api import implementation_names
from attnx.ops.cross.multi_stream import ip_adapter_attention, ip_adapter_reference
from attnx.registry import AttentionSpec, register_attention

register_attention(AttentionSpec(
    name="ip_adapter",
    fn=ip_adapter_attention,
    reference=ip_adapter_reference,
    patterns=frozenset({"NS", "NC"}),
    paper="Ye et al., 2023, IP-Adapter: Text Compatible Image Prompt Adapter for Text-to-Image Diffusion Models, "
          "arXiv 2308.06721, §3.2.2 (decoupled cross-attention; multi-stream form also covers MIP-Adapter, arXiv "
          "2409.17920 §3.2, and DPDEdit, arXiv 2409.01086 §3.3)",
    implementations=implementation_names(),
    defaults={"scale": 1.0},
    description="one query, several key/value streams (text, image, ...), one softmax per stream, weighted sum",
))
