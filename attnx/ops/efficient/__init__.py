"""CAB's efficient attentions (Zhang et al., 2023, "CAB: Comprehensive Attention Benchmarking on Long Sequence
Modeling", arXiv 2210.07661): Nystromformer, ABC, LARA, Transformer-LS (LongShort) and ProbSparse (Informer)."""
