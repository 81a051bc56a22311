"""Decoupled family: attention whose logits and values come from separately learned embeddings (DARE)."""
