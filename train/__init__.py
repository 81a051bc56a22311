"""The trainer: gin CLI, data pipelines (grain), optimizer (optax), checkpoints (orbax), metrics (ARCHITECTURE §6)."""
