"""HiLo attention (LITv2): Hi-Fi window attention and Lo-Fi pooled-key attention on a split of the heads."""
