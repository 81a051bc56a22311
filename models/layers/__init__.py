"""Building blocks shared by the model families: attention, MLP, norms, rotary embeddings, token embeddings."""
