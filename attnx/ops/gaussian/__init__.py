"""Gaussian family: GAAM, Gaussian re-weighting of features around any attention core."""
