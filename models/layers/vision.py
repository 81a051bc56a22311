"""Interchangeable parts of a (hierarchical) vision transformer, chosen by name in `ViTConfig` / `ViTStage`.

The papers of the vision mechanisms pair their attention with their own stem, downsampling and feed-forward layers
(CrossFormer's cross-scale embedding, TransNeXt's convolutional GLU, LITv2's depth-wise convolution FFN). They are
options of the one ViT (ARCHITECTURE §5: options, never forks), registered here by name:

    EMBEDDINGS[name](patch_size, channels, width, *, rngs, param_dtype)
        called images [B, H, W, C] -> tokens [B, (H / patch_size) * (W / patch_size), D], row-major.
    MERGES[name](width, out_width, *, norm_eps, rngs, param_dtype)
        called grid [B, h, w, D] -> grid [B, h / 2, w / 2, D'] (the downsampling between stages).
    MLPS[name](width, mlp_width, *, grid, rngs, param_dtype)
        called tokens [B, T, D] -> [B, T, D]; the last h * w tokens lie row-major on `grid` (h, w), any before them
        are class tokens.
"""

import jax
import jax.numpy as jnp
from flax import nnx

from models.layers.mixers.transnext import ConvGLU
from models.layers.mixers.crossformer import CrossScaleEmbedding, CrossScaleMerging
from models.layers.mixers.hilo import DWConvMlp
from models.layers.conv_embed import ConvDownsample, ConvTokenizer, OverlapDownsample, OverlapEmbedding
from models.layers.mlp import GeluMlp
from models.layers.norm import LayerNorm
from models.layers.patch import PatchEmbed


class PatchMerging(nnx.Module):
    """Swin's downsampling: grid [B, h, w, D] -> [B, h/2, w/2, D'] by concatenating each 2x2 cell's four tokens,
    LayerNorm over the 4D features, and a linear map without bias (Liu et al., 2021, §3.1, "patch merging").

    The four tokens are concatenated in row-major cell order ((0,0), (0,1), (1,0), (1,1)); Swin's code orders them
    (0,0), (1,0), (0,1), (1,1), so importing its weights permutes the kernel's input blocks.
    """

    def __init__(self, width: int, out_width: int, *, norm_eps: float, rngs: nnx.Rngs, param_dtype):
        self.norm = LayerNorm(4 * width, eps=norm_eps, param_dtype=param_dtype)
        init = nnx.initializers.variance_scaling(1.0, "fan_in", "truncated_normal")
        self.reduction_fd = nnx.Param(init(rngs.params(), (4 * width, out_width), param_dtype))

    def __call__(self, grid: jax.Array) -> jax.Array:
        batch, height, width, features = grid.shape
        cells = grid.reshape(batch, height // 2, 2, width // 2, 2, features).transpose(0, 1, 3, 2, 4, 5)
        cells = cells.reshape(batch, height // 2, width // 2, 4 * features)
        return jnp.einsum("bhwf,fd->bhwd", self.norm(cells), self.reduction_fd[...])


class TokenMlp(GeluMlp):
    """The ViT's two-layer GELU MLP with the `MLPS` signature (it ignores the grid)."""

    def __init__(self, width: int, mlp_width: int, *, grid: tuple[int, int], rngs: nnx.Rngs, param_dtype):
        del grid
        super().__init__(width, mlp_width, rngs=rngs, param_dtype=param_dtype)


EMBEDDINGS: dict[str, type] = {
    "patch": PatchEmbed,
    "conv_tokenizer": ConvTokenizer,
    "overlap": OverlapEmbedding,
    "cel": CrossScaleEmbedding,
}
MERGES: dict[str, type] = {
    "swin": PatchMerging,
    "conv": ConvDownsample,
    "overlap": OverlapDownsample,
    "cel": CrossScaleMerging,
}
MLPS: dict[str, type] = {
    "gelu": TokenMlp,
    "convglu": ConvGLU,
    "dwconv": DWConvMlp,
}


def check_part(owner: str, table: dict[str, type], table_name: str, value: object) -> None:
    """A ViT part chosen by name: unknown names fail at construction with the known ones listed."""
    if value not in table:
        raise ValueError(f"{owner}={value!r}: unknown; known {table_name}: {sorted(table)}")
