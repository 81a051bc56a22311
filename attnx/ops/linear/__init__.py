"""Linear-attention family: Lightning Attention-2 (decayed linear attention), Based (Taylor features), Performer
(FAVOR+) and cosFormer."""
