"""Cross-attention with several decoupled key/value streams: IP-Adapter, MIP-Adapter, DPDEdit, PortraitTalk."""
