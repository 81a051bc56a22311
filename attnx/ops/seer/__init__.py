"""SeerAttention (Gao et al., 2024, arXiv 2410.13276): a learned block gate over pooled pre-RoPE queries/keys picks
the key blocks each query block attends to; block-sparse softmax attention runs on the live blocks.

gate.py           block pooling, the gate logits, the block mask from gate probabilities, the distillation KL loss
ground_truth.py   the block max-pool of the model's own attention map (reference and chunked forms)
attention.py      the registered mechanism: block-sparse attention driven by gate logits or a block mask
"""
