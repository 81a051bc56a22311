"""Multimodal-LLM attention masks and head transforms (spec diffusion_multimodal_bench.md §7): CCA, MMA, EE-MLLM's
composite mask, VAR, VHR and head-specific logit modulation. The pure functions live in masks.py, var.py and
heads.py; attention.py holds the registered mechanisms and registration.py registers them."""

from attnx.ops.multimodal.heads import apply_head_scale, head_modulation_bias, vhd_scores, vhr_head_scale
from attnx.ops.multimodal.masks import (cca_allowed, cca_mask, cca_position_ids, cca_positions_of, cca_rings,
                                        composite_mask, mma_mask)
from attnx.ops.multimodal.var import var_image_centric, var_redistribute, var_sink_tokens

__all__ = ["apply_head_scale", "head_modulation_bias", "vhd_scores", "vhr_head_scale", "cca_allowed", "cca_mask",
           "cca_position_ids", "cca_positions_of", "cca_rings", "composite_mask", "mma_mask", "var_image_centric",
           "var_redistribute", "var_sink_tokens"]
