"""Grouped attention over a token grid: CrossFormer's long short distance attention (SDA/LDA) with its dynamic
position bias (lsda.py)."""
