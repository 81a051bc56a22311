"""Linear-attention family: Lightning Attention-2 (decayed causal linear attention) and Based (Taylor features)."""
