"""Landmark Attention (Mohtashami & Jaggi, 2023, arXiv 2305.16300): grouped softmax over landmark-gated blocks for
training, top-k block retrieval by landmark keys for inference. Public entry: `attnx.ops.landmark.landmark`."""
