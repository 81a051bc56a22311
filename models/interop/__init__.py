"""Weights in and out of the formats users already have: Hugging Face `transformers` Llama checkpoints, timm ViTs and
diffusers / original-repository DiTs (issue 9). Each converter is a pure function of a state dict (or a path to one)
and the attnx model config; nothing here imports PyTorch except to read `.bin` files, and nothing downloads."""
from models.interop.hf_llama import from_hf_llama, hf_llama_config_to_attnx, to_hf_llama  # noqa: F401
from models.interop.timm_vit import from_timm_vit, resample_position_grid, to_timm_vit  # noqa: F401
from models.interop.diffusers_dit import (from_diffusers_dit, from_dit_original, to_diffusers_dit,  # noqa: F401
                                          to_dit_original)
