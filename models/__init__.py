"""Flax NNX models built on the pure-JAX attention functions of `attnx` (ARCHITECTURE §1, §5)."""
