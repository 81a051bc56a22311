"""Linear-attention family: Lightning Attention-2 (decayed causal linear attention); Based comes next."""
