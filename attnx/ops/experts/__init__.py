"""Expert family: attention experts mixed by a soft router (BAM's soft Mixture of Attention)."""
