"""Dependency family: reversed attention of DependencyViT (children send messages to the parents they attend to)."""
