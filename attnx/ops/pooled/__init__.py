"""Pooled-query family: queries pooled over a window of positions (MQSA)."""
