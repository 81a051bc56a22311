"""Rotary position embeddings for the layers: the pure function lives in attnx.rotary (mechanisms rotate inside
attention functions too)."""

from attnx.rotary import rotary_embedding

__all__ = ["rotary_embedding"]
