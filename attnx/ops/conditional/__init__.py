"""Conditional family: condition tokens that query image tokens (Conditional Cross-Attention Network)."""
