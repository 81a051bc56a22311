"""Vision Transformer (Dosovitskiy et al., 2021, "An Image is Worth 16x16 Words", arXiv 2010.11929) and its
hierarchical variant with Swin-style patch merging (Liu et al., 2021, "Swin Transformer", arXiv 2103.14030, §3.1).

`ViTConfig` is a frozen dataclass validated on construction; `ViT(config, rngs=...)` builds the NNX module. The
layout of the named presets is the timm / big_vision one: pre-norm blocks with LayerNorm (eps 1e-6), biases on the
query/key/value/output projections, an exact-GELU MLP, a CLS token with a learned position embedding that covers
it, a final LayerNorm and a linear head, so parameter counts match the published models (ViT-B/16: 86,567,656).

The attention mixer is chosen by name (`ViTConfig.attention`, default "softmax"), so any registered mechanism that
supports non-causal self attention (CAB pattern NS) drops in with one gin line (ARCHITECTURE §5).

Hierarchical models (PVT, Swin, HiLo/LITv2, TransNeXt, CrossFormer) are the same module with `ViTConfig.stages`:
the top-level fields describe the first stage, at the patch grid, and each `ViTStage` adds a stage that begins with
a 2x2 patch merge (halving the grid, changing the width) and has its own depth, heads and attention mechanism.
"""

import dataclasses
from typing import Any, Iterator, Literal, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import attnx
from models.layers import PARAM_DTYPES, check_param_dtype
from models.layers.attention import Attention, check_attention_choice, layer_entry, token_mixer
from models.layers.mixers import SPATIAL_MIXERS
from models.layers.norm import LayerNorm
from models.layers.patch import sincos_2d
from models.layers.sharding import constrain
from models.layers.vision import EMBEDDINGS, MERGES, MLPS, check_part

POOLINGS = ("cls", "mean")
POSITIONS = ("learned", "sincos", "none")


def _check_positive_ints(owner: str, obj: Any, names: tuple[str, ...]) -> None:
    for name in names:
        value = getattr(obj, name)
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ValueError(f"{owner}.{name} must be a positive int, got {value!r}")


@dataclasses.dataclass(frozen=True)
class ViTStage:
    """One stage after the first of a hierarchical ViT: a 2x2 patch merge to `width`, then `depth` blocks.

    attention / attention_kwargs: None inherits `ViTConfig.attention` / `ViTConfig.attention_kwargs`, so an
    overlay that switches the mechanism switches it everywhere unless a stage names its own.
    layer_attention: per-block entries repeated over the stage's blocks (see `ViTConfig.layer_attention`).
    mlp_width: 0 means 4 * width, the ratio of ViT and Swin.
    merge: the downsampling into this stage, a name in `models.layers.vision.MERGES` ("swin": 2x2 patch merging).
    mlp: the blocks' feed-forward layer, a name in `MLPS`; None inherits `ViTConfig.mlp`.
    use_attention: False gives blocks without a token mixer (LITv2's first two stages are MLP blocks only).
    qkv_bias: None inherits `ViTConfig.qkv_bias`.
    position: "learned" adds a learned position embedding (one vector per token of the stage's grid, truncated
        normal std 0.02) after the merge, as PVT's per-stage pos_embed; "none" (default) adds none.
    """

    width: int
    depth: int
    num_heads: int
    mlp_width: int = 0
    attention: str | None = None
    attention_kwargs: Mapping[str, Any] | None = None
    layer_attention: tuple[Any, ...] = ()
    merge: str = "swin"
    mlp: str | None = None
    use_attention: bool = True
    qkv_bias: bool | None = None
    position: Literal["learned", "none"] = "none"

    @property
    def resolved_mlp_width(self) -> int:
        return self.mlp_width or 4 * self.width


@dataclasses.dataclass(frozen=True)
class ViTConfig:
    """Shape and options of a `ViT`. Fields default to the `tiny` preset (8x8 digits).

    image_size: an int for square images or (height, width). pooling: "cls" (a learned class token, read out after
    the final norm) or "mean" (the average of all tokens; required when `stages` is non-empty, as no class token
    survives patch merging). position: "learned" (one vector per token, the CLS token included, as in timm) or
    "sincos" (the fixed 2-D embedding of MAE; the CLS token gets none) or "none" (the convolutional hierarchical
    models, NAT, CrossFormer and TransNeXt, whose positions come from their stems and relative biases). qk_norm:
    see `Attention`. stages: extra stages of a hierarchical model (see `ViTStage`); empty for the plain ViT.
    layer_attention: per-block attention of the first stage, entries repeated over its blocks (block l takes entry
        l % len), each None (`attention` / `attention_kwargs`), a name, or (name, kwargs): CrossFormer alternates
        SDA and LDA blocks, DiNAT alternates dilations.
    embed: the patch embedding, a name in `models.layers.vision.EMBEDDINGS` ("patch": a p x p convolution with
        stride p). mlp: the blocks' feed-forward layer, a name in `MLPS` ("gelu"). use_attention: see `ViTStage`.
    qkv_bias: False builds the shared attention layer's query/key/value projections without biases (the output
        projection keeps its bias), as timm's qkv_bias=False (InLine-DeiT); mechanisms with their own whole layer
        (SPATIAL_MIXERS) own their projections and are refused with it.
    stage_norm: True closes every stage but the last with its own LayerNorm (eps `norm_eps`), before the next
        stage's merge, as TransNeXt's norm1-norm3 (the last stage's norm4 is `final_norm`); False (default) has
        none, as Swin and the ViT.
    """

    image_size: int | tuple[int, int] = 8
    patch_size: int = 4
    channels: int = 1
    num_classes: int = 10
    width: int = 64
    depth: int = 4
    num_heads: int = 4
    mlp_width: int = 128
    pooling: Literal["cls", "mean"] = "cls"
    position: Literal["learned", "sincos", "none"] = "learned"
    attention: str = "softmax"
    attention_kwargs: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    layer_attention: tuple[Any, ...] = ()
    embed: str = "patch"
    mlp: str = "gelu"
    use_attention: bool = True
    qk_norm: bool = False
    qkv_bias: bool = True
    norm_eps: float = 1e-6
    stages: tuple[ViTStage, ...] = ()
    param_dtype: str = "float32"
    stage_norm: bool = False

    def __post_init__(self):
        # gin and JSON give lists; tuples keep the frozen config hashable and comparable.
        if isinstance(self.image_size, list):
            object.__setattr__(self, "image_size", tuple(self.image_size))
        if isinstance(self.stages, list):
            object.__setattr__(self, "stages", tuple(self.stages))
        if isinstance(self.layer_attention, list):
            object.__setattr__(self, "layer_attention", tuple(self.layer_attention))
        size = self.image_size
        if isinstance(size, int):
            size = (size, size)
        if not (isinstance(size, tuple) and len(size) == 2
                and all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in size)):
            raise ValueError(f"ViTConfig.image_size must be a positive int or (height, width), got "
                             f"{self.image_size!r}")
        _check_positive_ints("ViTConfig", self, ("patch_size", "channels", "num_classes", "width", "depth",
                                                 "num_heads", "mlp_width"))
        if size[0] % self.patch_size or size[1] % self.patch_size:
            raise ValueError(f"ViTConfig.image_size={self.image_size!r} is not divisible by "
                             f"patch_size={self.patch_size}")
        if self.width % self.num_heads:
            raise ValueError(f"ViTConfig.width={self.width} is not divisible by num_heads={self.num_heads}")
        if self.pooling not in POOLINGS:
            raise ValueError(f"ViTConfig.pooling={self.pooling!r}; allowed: {list(POOLINGS)}")
        if self.position not in POSITIONS:
            raise ValueError(f"ViTConfig.position={self.position!r}; allowed: {list(POSITIONS)}")
        if self.position == "sincos" and self.width % 4:
            raise ValueError(f"ViTConfig.position='sincos' needs a width divisible by 4, got width={self.width}")
        if not self.norm_eps > 0:
            raise ValueError(f"ViTConfig.norm_eps must be > 0, got {self.norm_eps!r}")
        check_param_dtype("ViTConfig", self.param_dtype)
        check_attention_choice("ViTConfig", self.attention, self.attention_kwargs, causal=False)
        check_part("ViTConfig.embed", EMBEDDINGS, "embeddings", self.embed)
        check_part("ViTConfig.mlp", MLPS, "MLPs", self.mlp)
        self._check_blocks("ViTConfig", self.layer_attention, 0, self.depth, self.use_attention)
        self._check_qkv_bias("ViTConfig", 0, self.qkv_bias)
        if not isinstance(self.stage_norm, bool):
            raise ValueError(f"ViTConfig.stage_norm must be a bool, got {self.stage_norm!r}")
        if self.stages:
            self._check_stages()

    def _check_stages(self) -> None:
        if self.pooling != "mean":
            raise ValueError(f"ViTConfig.pooling={self.pooling!r} with stages: a hierarchical ViT needs "
                             f"pooling='mean' (no class token survives patch merging); allowed: ['mean']")
        grid = self.grid
        for index, stage in enumerate(self.stages):
            owner = f"ViTConfig.stages[{index}]"
            if not isinstance(stage, ViTStage):
                raise ValueError(f"{owner} must be a ViTStage, got {stage!r}")
            _check_positive_ints(owner, stage, ("width", "depth", "num_heads"))
            if not isinstance(stage.mlp_width, int) or stage.mlp_width < 0:
                raise ValueError(f"{owner}.mlp_width must be an int >= 0 (0: 4 * width), got {stage.mlp_width!r}")
            if stage.width % stage.num_heads:
                raise ValueError(f"{owner}.width={stage.width} is not divisible by num_heads={stage.num_heads}")
            if grid[0] % 2 or grid[1] % 2:
                raise ValueError(f"{owner}: 2x2 patch merging needs an even token grid, but the grid before this "
                                 f"stage is {grid[0]}x{grid[1]} (image {self.image_size}, patch {self.patch_size})")
            grid = (grid[0] // 2, grid[1] // 2)
            if isinstance(stage.layer_attention, list):
                object.__setattr__(stage, "layer_attention", tuple(stage.layer_attention))
            check_part(f"{owner}.merge", MERGES, "merges", stage.merge)
            if stage.mlp is not None:
                check_part(f"{owner}.mlp", MLPS, "MLPs", stage.mlp)
            self._check_blocks(owner, stage.layer_attention, index + 1, stage.depth, stage.use_attention)
            if stage.qkv_bias is not None:
                self._check_qkv_bias(owner, index + 1, stage.qkv_bias)
            if stage.position not in ("learned", "none"):
                raise ValueError(f"{owner}.position={stage.position!r}; allowed: ['learned', 'none']")

    def _check_blocks(self, owner: str, layer_attention: Any, stage: int, depth: int, use_attention: Any) -> None:
        if not isinstance(use_attention, bool):
            raise ValueError(f"{owner}.use_attention must be a bool, got {use_attention!r}")
        if not isinstance(layer_attention, tuple):
            raise ValueError(f"{owner}.layer_attention must be a tuple of entries, got {layer_attention!r}")
        if not use_attention:
            return
        for block in range(min(depth, len(layer_attention)) or 1):
            attention, attention_kwargs = self.block_attention(stage, block)
            check_attention_choice(f"{owner}.layer_attention[{block}]" if layer_attention else owner, attention,
                                   attention_kwargs, causal=False)

    def _check_qkv_bias(self, owner: str, stage: int, qkv_bias: Any) -> None:
        if not isinstance(qkv_bias, bool):
            raise ValueError(f"{owner}.qkv_bias must be a bool, got {qkv_bias!r}")
        depth = self.depth if stage == 0 else self.stages[stage - 1].depth
        if qkv_bias or not self.stage_parts(stage)[1]:
            return
        for block in range(depth):
            name = attnx.get_attention(self.block_attention(stage, block)[0]).name
            if name in SPATIAL_MIXERS:
                raise ValueError(f"{owner}.qkv_bias=False: block {block} uses {name!r}, whose own layer "
                                 f"(SPATIAL_MIXERS) owns its projections; qkv_bias=False applies to the shared "
                                 f"attention layer only")

    @property
    def image_hw(self) -> tuple[int, int]:
        return (self.image_size, self.image_size) if isinstance(self.image_size, int) else tuple(self.image_size)

    @property
    def grid(self) -> tuple[int, int]:
        """The patch grid (h, w) of the first stage."""
        height, width = self.image_hw
        return height // self.patch_size, width // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid[0] * self.grid[1]

    @property
    def final_width(self) -> int:
        return self.stages[-1].width if self.stages else self.width

    def stage_attention(self, stage: int) -> tuple[str, Mapping[str, Any]]:
        """(mechanism name, kwargs) of stage `stage` (0 is the first, described by the top-level fields)."""
        if stage == 0:
            return self.attention, self.attention_kwargs
        spec = self.stages[stage - 1]
        attention = self.attention if spec.attention is None else spec.attention
        kwargs = self.attention_kwargs if spec.attention_kwargs is None else spec.attention_kwargs
        return attention, kwargs

    def block_attention(self, stage: int, block: int) -> tuple[str, Mapping[str, Any]]:
        """(mechanism name, kwargs) of block `block` of stage `stage`, after the stage's layer_attention."""
        attention, kwargs = self.stage_attention(stage)
        entries = self.layer_attention if stage == 0 else self.stages[stage - 1].layer_attention
        owner = "ViTConfig.layer_attention" if stage == 0 else f"ViTConfig.stages[{stage - 1}].layer_attention"
        return layer_entry(owner, entries, block, attention, kwargs)

    def stage_qkv_bias(self, stage: int) -> bool:
        """Whether stage `stage`'s query/key/value projections have biases."""
        if stage == 0 or self.stages[stage - 1].qkv_bias is None:
            return self.qkv_bias
        return self.stages[stage - 1].qkv_bias

    def stage_parts(self, stage: int) -> tuple[str, bool]:
        """(MLP name, use_attention) of stage `stage`."""
        if stage == 0:
            return self.mlp, self.use_attention
        spec = self.stages[stage - 1]
        return (self.mlp if spec.mlp is None else spec.mlp), spec.use_attention


_IMAGENET = dict(image_size=224, patch_size=16, channels=3, num_classes=1000, pooling="cls", position="learned")

PRESETS: dict[str, ViTConfig] = {
    # The published sizes (ViT paper Table 1; Ti and S from DeiT, Touvron et al., 2021, arXiv 2012.12877).
    "Ti/16": ViTConfig(**_IMAGENET, width=192, depth=12, num_heads=3, mlp_width=768),
    "S/16": ViTConfig(**_IMAGENET, width=384, depth=12, num_heads=6, mlp_width=1536),
    "B/16": ViTConfig(**_IMAGENET, width=768, depth=12, num_heads=12, mlp_width=3072),
    "L/16": ViTConfig(**_IMAGENET, width=1024, depth=24, num_heads=16, mlp_width=4096),
    # 8x8 digits at patch 4 (2x2 patches + CLS), the model of the spec's measured baseline
    # (../shared/specs/vision_mechanisms.md §12); configs/experiments/vit_digits.gin trains it.
    "tiny": ViTConfig(),
    # 8x8 digits at patch 1: an 8x8 grid of 64 tokens (so local mechanisms have a neighbourhood), merged to 4x4.
    "tiny_hierarchical": ViTConfig(patch_size=1, width=32, depth=2, num_heads=2, mlp_width=64, pooling="mean",
                                   stages=(ViTStage(width=64, depth=2, num_heads=4, mlp_width=128),)),
}

# ---- The small models of the vision-mechanism papers (ImageNet, 224 px, 4x4 stems, four stages) ----
_HIERARCHICAL = dict(image_size=224, patch_size=4, channels=3, num_classes=1000, pooling="mean", position="none")


def _stages(widths, depths, heads, mlp_ratios, **per_stage) -> tuple[ViTStage, ...]:
    """Stages 2-4 from per-stage lists (index 0, the first stage, is the config's top level); `per_stage` values
    are lists too, or a constant."""
    pick = lambda value, i: value[i] if isinstance(value, list) else value  # noqa: E731
    return tuple(ViTStage(width=widths[i], depth=depths[i], num_heads=heads[i], mlp_width=mlp_ratios[i] * widths[i],
                          **{name: pick(value, i) for name, value in per_stage.items()}) for i in (1, 2, 3))


def _nat_mini() -> ViTConfig:
    """NAT-Mini (Hassani et al., 2023, arXiv 2204.07143, Table 1): conv tokenizer and downsamplers, 7x7
    neighbourhoods with relative position biases, depths 3-4-6-5, heads 2-4-8-16, width 64, MLP ratio 3 (20M)."""
    widths, depths, heads = [64, 128, 256, 512], [3, 4, 6, 5], [2, 4, 8, 16]
    return ViTConfig(**_HIERARCHICAL, embed="conv_tokenizer", width=64, depth=3, num_heads=2, mlp_width=192,
                     attention="neighborhood", attention_kwargs={"kernel_size": 7, "use_rpb": True}, norm_eps=1e-5,
                     stages=_stages(widths, depths, heads, [3] * 4, merge="conv"))


def _crossformer_t() -> ViTConfig:
    """CrossFormer-T (Wang et al., 2022, arXiv 2108.00154, Table 1; code configs/crossformer/tiny_patch4_group7):
    cross-scale embedding and merging, blocks alternating SDA and LDA (group 7, intervals 8-4-2-1) with the dynamic
    position bias, depths 1-1-8-6, heads 2-4-8-16, width 64 (27.8M). The last stage's 7x7 grid is one group."""
    def alternate(interval: int) -> tuple:
        return (("lsda", {"mode": "sda", "group_size": 7}),
                ("lsda", {"mode": "lda", "group_size": 7, "interval": interval}))
    widths, depths, heads, intervals = [64, 128, 256, 512], [1, 1, 8, 6], [2, 4, 8, 16], [8, 4, 2, 1]
    return ViTConfig(**_HIERARCHICAL, embed="cel", width=64, depth=1, num_heads=2, mlp_width=256, attention="lsda",
                     attention_kwargs={"mode": "sda", "group_size": 7}, layer_attention=alternate(8), norm_eps=1e-5,
                     stages=_stages(widths, depths, heads, [4] * 4, merge="cel",
                                    layer_attention=[alternate(i) for i in intervals]))


def _transnext_micro() -> ViTConfig:
    """TransNeXt-Micro (Shi, 2024, arXiv 2311.17132, Table; code transnext_micro): overlapping 7x7 stem and 3x3
    downsamplers, aggregated attention (3x3 window, pooling ratios 8-4-2, full attention in the last stage),
    ConvGLU with MLP ratios 8-8-4-4, depths 2-2-15-2, heads 2-4-8-16, widths 48-96-192-384, a LayerNorm closing
    every stage (`stage_norm`, the code's norm1-norm3) (12.8M)."""
    widths, depths, heads, ratios, pools = [48, 96, 192, 384], [2, 2, 15, 2], [2, 4, 8, 16], [8, 8, 4, 4], [8, 4, 2, 1]
    return ViTConfig(**_HIERARCHICAL, embed="overlap", width=48, depth=2, num_heads=2, mlp_width=8 * 48,
                     mlp="convglu", attention="aggregated", attention_kwargs={"window": 3, "sr_ratio": 8},
                     stage_norm=True,
                     stages=_stages(widths, depths, heads, ratios, merge="overlap", attention="aggregated",
                                    attention_kwargs=[{"window": 3, "sr_ratio": r} for r in pools]))


def _litv2_s() -> ViTConfig:
    """LITv2-S (Pan et al., 2022, "Fast Vision Transformers with HiLo Attention", arXiv 2205.13213; code
    configs/litv2-s.yaml): depths 2-2-6-2, heads 3-6-12-24, width 96, DW-conv FFNs everywhere, no attention in the
    first two stages, HiLo (alpha 0.9) with 2x2 windows in stage 3 and 1x1 (plain MHSA) in stage 4 (28M).
    Departure: Swin 2x2 merging stands in for LITv2's deformable token merging (DTM), whose learned sampling offsets
    attnx does not implement; the count stays within 1% of the paper's."""
    widths, depths, heads = [96, 192, 384, 768], [2, 2, 6, 2], [3, 6, 12, 24]
    hilo = [None, None, {"alpha": 0.9, "window": 2}, {"alpha": 0.9, "window": 1}]
    return ViTConfig(**_HIERARCHICAL, width=96, depth=2, num_heads=3, mlp_width=384, mlp="dwconv", use_attention=False,
                     attention="hilo", attention_kwargs=hilo[2],
                     stages=_stages(widths, depths, heads, [4] * 4, use_attention=[None, False, True, True],
                                    attention_kwargs=hilo))


def _inline_deit_t() -> ViTConfig:
    """InLine-DeiT-T (Han et al., 2024, "Bridging the Divide: Reconsidering Softmax and Linear Attention",
    arXiv 2412.06590; code cfgs/inline_deit_t.yaml, models/inline_deit.py): DeiT-T with 6 heads and InLine attention
    in every block, the dynamic depth-wise residual included (6,477,736 parameters, the code's count; 6.5M).
    The q/k/v projections keep their biases: InLineAttention's signature defaults to qkv_bias=False, but the code's
    VisionTransformer (qkv_bias=True by default, not overridden by inline_deit_tiny) passes True to every block
    (so does InLine-PVT, and InLine-Swin's QKV_BIAS is True); `ViTConfig.qkv_bias=False` builds the other form."""
    return ViTConfig(**_IMAGENET, width=192, depth=12, num_heads=6, mlp_width=768, attention="inline")


def _inline_swin_t() -> ViTConfig:
    """InLine-Swin-T (arXiv 2412.06590; code cfgs/inline_swin_t.yaml, models/inline_swin.py): Swin-T (patch 4, width
    96, depths 2-2-6-2, heads 3-6-12-24, MLP ratio 4, 2x2 patch merging, LayerNorm eps 1e-5, qkv biases, mean pool)
    with ATTN_TYPE 'IIIS': InLine in Swin windows of WINDOW_SIZE 56 in stages 1-3, the odd blocks shifted by 28
    (the code's rule; at 224 px the window is clamped to the 56/28/14 grids, so these stages are global and
    unshifted), and softmax window attention with a relative position bias in stage 4, window max(7, 56 // 8) = 7
    (30M published). Departures: stage 4 is neighbourhood attention with kernel 7 and NAT's relative bias table
    ((2*7 - 1)^2 per head, Swin's size); on stage 4's 7x7 grid at 224 px that is Swin's single 7x7 window (every
    query sees every key, bias by relative offset; Swin's table is indexed by query - key, NAT's by key - query, a
    relabelling of the learned table), but at other resolutions it slides instead of partitioning. The 'patch'
    embedding has no LayerNorm after it (Swin's patch_norm: 192 parameters)."""
    widths, depths, heads = [96, 192, 384, 768], [2, 2, 6, 2], [3, 6, 12, 24]
    inline = (("inline", {"window": 56}), ("inline", {"window": 56, "shift": 28}))
    softmax_window = (("neighborhood", {"kernel_size": 7, "use_rpb": True}),)
    return ViTConfig(**_HIERARCHICAL, width=96, depth=2, num_heads=3, mlp_width=384, norm_eps=1e-5,
                     attention="inline", attention_kwargs={"window": 56}, layer_attention=inline,
                     stages=_stages(widths, depths, heads, [4] * 4,
                                    layer_attention=[inline, inline, inline, softmax_window]))


def _inline_pvt_t() -> ViTConfig:
    """InLine-PVT-T (arXiv 2412.06590; code cfgs/inline_pvt_t.yaml, models/inline_pvt.py inline_pvt_tiny): PVT-T
    with InLine in every block and no spatial reduction (la_sr_ratios '1111'): widths 64-128-320-512, depths 2-2-2-2,
    heads 2-4-10-16, MLP ratios 8-8-4-4, qkv biases, LayerNorm eps 1e-6, a learned position embedding per stage,
    mean pooling (12.0M published). Departures: Swin 2x2 patch merging (LayerNorm then a linear map without bias)
    stands in for PVT's 2x2 stride-2 convolution with bias then LayerNorm between stages (the same 2x2 input
    window; attnx has no such merge yet), the 4x4 stem has no LayerNorm after it, and the ViT's final LayerNorm,
    which the code's model lacks, is kept: 2,112 parameters more in all (the code's count is 12,032,232)."""
    widths, depths, heads, ratios = [64, 128, 320, 512], [2, 2, 2, 2], [2, 4, 10, 16], [8, 8, 4, 4]
    return ViTConfig(**{**_HIERARCHICAL, "position": "learned"}, width=64, depth=2, num_heads=2, mlp_width=512,
                     attention="inline", stages=_stages(widths, depths, heads, ratios, position="learned"))


def _transnext(widths, depths, heads, n_shared=None, top_k=None) -> ViTConfig:
    """TransNeXt (Shi, 2024, "TransNeXt: Robust Foveal Visual Perception for Vision Transformers", CVPR 2024, arXiv
    2311.17132, §3-4; code DaiShiResearch/TransNeXt classification/transnext.py) at the Small/Base shapes: 7x7 stride-4
    stem and 3x3 stride-2 downsamplers (convolution with bias, then LayerNorm), aggregated attention with a 3x3
    window and pooling ratios 8-4-2 (a 7x7 pooled grid at 224 px), full attention in the last stage, ConvGLU with MLP
    ratios 8-8-4-4, qkv biases, LayerNorm eps 1e-6, a LayerNorm closing every stage (the code's norm1-norm4:
    `stage_norm`, the last one the final norm), mean pooling.

    With n_shared / top_k (per-stage lists) it is MoH-ViT (Jin et al., 2024, "MoH: Multi-Head Attention as
    Mixture-of-Head Attention", arXiv 2410.11842, §4.1; code SkyworkAI/MoH MoH-ViT/transnext.py `moh_transnext_*`,
    attention_native.py, attention.py): the same model whose attention layers, aggregated and full, gate their heads
    per token (the first n_shared heads shared, top_k of the rest routed) before the output projection, with the
    router linears W_r [D, H - n_shared] (routed stages), W_s [D, n_shared] (n_shared > 1) and W_0 [D, 2] (both
    kinds), all bias-free, as the code's wg, wg_1, wg_0. A stage with top_k = 0 gates its heads with n_shared *
    softmax(W_s x), as the code's routed_head = 0 branch does.
    Departures (none changes a parameter count or a forward output): no stochastic depth (both codes train S with
    drop_path 0.45, B with 0.6), and the routers start Xavier-uniform (attnx's MoH routers) where the code's
    TransNeXt init gives every nn.Linear, wg/wg_0/wg_1 included, truncated normal std 0.02. (transnext_micro, an
    older preset, has no stage norms: 672 parameters fewer than the code's.)"""
    ratios, pools = [8, 8, 4, 4], [8, 4, 2, 1]
    kwargs = [{"window": 3, "sr_ratio": r} for r in pools]
    if n_shared is not None:
        kwargs = [{**k, "n_shared": s, "top_k": t} for k, s, t in zip(kwargs, n_shared, top_k)]
    return ViTConfig(**_HIERARCHICAL, embed="overlap", width=widths[0], depth=depths[0], num_heads=heads[0],
                     mlp_width=ratios[0] * widths[0], mlp="convglu", attention="aggregated", attention_kwargs=kwargs[0],
                     stage_norm=True, stages=_stages(widths, depths, heads, ratios, merge="overlap",
                                                     attention="aggregated", attention_kwargs=kwargs))


# TransNeXt-Small / -Base shapes (the code's transnext_small / transnext_base; moh_transnext_* use the same).
_TRANSNEXT_S = dict(widths=[72, 144, 288, 576], depths=[5, 5, 22, 5], heads=[3, 6, 12, 24])
_TRANSNEXT_B = dict(widths=[96, 192, 384, 768], depths=[5, 5, 23, 5], heads=[4, 8, 16, 32])

PRESETS.update({
    # 49.7M / 89.7M published (TransNeXt README); 49,741,564 / 89,721,496, the code's modules' counts exactly
    "transnext_small": _transnext(**_TRANSNEXT_S),
    "transnext_base": _transnext(**_TRANSNEXT_B),
    # MoH-ViT-S-75 / S-80 / B-75 / B-50: (shared heads, routed top-k) per stage, as moh_transnext_{small,base}_*;
    # 49,910,548 (S-75, S-80), 90,020,632 (B-75), 90,023,512 (B-50), the code's counts exactly
    "moh_vit_s_75": _transnext(**_TRANSNEXT_S, n_shared=[3, 6, 3, 4], top_k=[0, 0, 6, 12]),
    "moh_vit_s_80": _transnext(**_TRANSNEXT_S, n_shared=[3, 6, 3, 8], top_k=[0, 0, 6, 12]),
    "moh_vit_b_75": _transnext(**_TRANSNEXT_B, n_shared=[4, 8, 4, 5], top_k=[0, 0, 8, 16]),
    "moh_vit_b_50": _transnext(**_TRANSNEXT_B, n_shared=[2, 2, 2, 4], top_k=[2, 4, 6, 8]),
})

PRESETS.update({"nat_mini": _nat_mini(), "crossformer_t": _crossformer_t(), "transnext_micro": _transnext_micro(),
                "litv2_s": _litv2_s(), "inline_deit_t": _inline_deit_t(), "inline_swin_t": _inline_swin_t(),
                "inline_pvt_t": _inline_pvt_t()})


def vit_config(preset: str = "tiny", **overrides: Any) -> ViTConfig:
    """Returns the named preset with `overrides` applied, e.g. `vit_config("B/16", num_classes=10)`."""
    if preset not in PRESETS:
        raise ValueError(f"unknown ViT preset {preset!r}; known presets: {sorted(PRESETS)}")
    return dataclasses.replace(PRESETS[preset], **overrides)


class EncoderBlock(nnx.Module):
    """Pre-norm residual block: x + attention(norm(x)), then + mlp(norm(x)). Tokens [B, T, D]."""

    def __init__(self, width: int, num_heads: int, mlp_width: int, *, attention: str | None,
                 attention_kwargs: Mapping[str, Any], qk_norm: bool, norm_eps: float, rngs: nnx.Rngs, param_dtype,
                 grid: tuple[int, int], mlp: str = "gelu", qkv_bias: bool = True):
        if attention is None:  # an attention-free block (LITv2's early stages): x + mlp(norm(x)) only
            self.attention_norm = self.attention = None
        else:
            self.attention_norm = LayerNorm(width, eps=norm_eps, param_dtype=param_dtype)
            self.attention = token_mixer(width, num_heads, attention=attention, attention_kwargs=attention_kwargs,
                                         grid=grid, qk_norm=qk_norm, qkv_bias=qkv_bias, rngs=rngs,
                                         param_dtype=param_dtype)
        self.mlp_norm = LayerNorm(width, eps=norm_eps, param_dtype=param_dtype)
        self.mlp = MLPS[mlp](width, mlp_width, grid=grid, rngs=rngs, param_dtype=param_dtype)

    def __call__(self, x: jax.Array, intermediates: dict[str, jax.Array] | None = None, name: str = "") -> jax.Array:
        if self.attention is not None:
            attention_input = self.attention_norm(x)
            x = x + self.attention(attention_input)
            if intermediates is not None:
                intermediates[f"{name}/attention_input"] = attention_input
        x = x + self.mlp(self.mlp_norm(x))
        if intermediates is not None:
            intermediates[f"{name}/output"] = x
        return x


class Stage(nnx.Module):
    """An optional patch merge followed by `depth` encoder blocks at a fixed token grid.

    `grid` (h, w) is kept as static metadata so that a mechanism needing the 2-D layout of the tokens (neighbourhood
    attention, HiLo, TransNeXt) can be handed it; the blocks themselves see flattened tokens [B, h * w, D].
    """

    def __init__(self, config: ViTConfig, index: int, *, grid: tuple[int, int], in_width: int | None, width: int,
                 depth: int, num_heads: int, mlp_width: int, rngs: nnx.Rngs, param_dtype):
        self.grid = grid
        merge = "swin" if index == 0 else config.stages[index - 1].merge
        self.merge = (None if in_width is None else
                      MERGES[merge](in_width, width, norm_eps=config.norm_eps, rngs=rngs, param_dtype=param_dtype))
        mlp, use_attention = config.stage_parts(index)
        blocks = []
        for block in range(depth):
            attention, attention_kwargs = config.block_attention(index, block)
            blocks.append(EncoderBlock(
                width, num_heads, mlp_width, attention=attention if use_attention else None,
                attention_kwargs=attention_kwargs, qk_norm=config.qk_norm, norm_eps=config.norm_eps, rngs=rngs,
                param_dtype=param_dtype, grid=grid, mlp=mlp, qkv_bias=config.stage_qkv_bias(index)))
        self.blocks = nnx.List(blocks)
        learned = index > 0 and config.stages[index - 1].position == "learned"
        # Drawn after the blocks, so that stages without one draw exactly what they drew before this option.
        self.position_td = (nnx.Param(nnx.initializers.truncated_normal(0.02)(
            rngs.params(), (grid[0] * grid[1], width), param_dtype)) if learned else None)
        # TransNeXt's per-stage norm (ViTConfig.stage_norm); the last stage's is the model's final norm. It draws no
        # random numbers, so the other weights are the same with or without it.
        self.output_norm = (LayerNorm(width, eps=config.norm_eps, param_dtype=param_dtype)
                            if config.stage_norm and index < len(config.stages) else None)


class ViT(nnx.Module):
    """images [B, H, W, C] -> logits [B, num_classes] (float32).

    `model(images, return_intermediates=True)` returns (logits, intermediates) with, for probing:
        "embedded"                 tokens after the patch embedding, CLS token and positions [B, T, D]
        "<block>/attention_input"  the normalised input of each block's attention [B, T, D]
        "<block>/output"           each block's output [B, T, D]
        "stage_<s>/output"         (hierarchical) each stage's output as a grid [B, h, w, D]
        "encoded"                  after the final norm [B, T, D]
        "pre_logits"               the pooled representation [B, D]
    where <block> is "block_<i>" for a plain ViT and "stage_<s>/block_<i>" for a hierarchical one.
    """

    def __init__(self, config: ViTConfig, *, rngs: nnx.Rngs):
        dtype = PARAM_DTYPES[config.param_dtype]
        # Static settings only: the config itself holds dicts, which are unhashable graph metadata.
        self.pooling = config.pooling
        self.position = config.position
        self.image_hw = config.image_hw
        self.channels = config.channels
        self.hierarchical = bool(config.stages)
        self.patch_embed = EMBEDDINGS[config.embed](config.patch_size, config.channels, config.width, rngs=rngs,
                                                    param_dtype=dtype)
        with_cls = config.pooling == "cls"
        # timm and big_vision start the class token at (almost) zero; it learns its content from the blocks.
        self.cls_token_d = nnx.Param(jnp.zeros((config.width,), dtype)) if with_cls else None
        if config.position == "learned":
            # std 0.02, the truncated normal of timm; the CLS token has a position slot too (timm's layout).
            init = nnx.initializers.truncated_normal(0.02)
            self.position_td = nnx.Param(init(rngs.params(), (config.num_patches + with_cls, config.width), dtype))
        else:
            self.position_td = None
        stages, grid, width = [], config.grid, None
        for index in range(len(config.stages) + 1):
            if index:
                spec = config.stages[index - 1]
                grid = (grid[0] // 2, grid[1] // 2)
                shape = dict(width=spec.width, depth=spec.depth, num_heads=spec.num_heads,
                             mlp_width=spec.resolved_mlp_width)
            else:
                shape = dict(width=config.width, depth=config.depth, num_heads=config.num_heads,
                             mlp_width=config.mlp_width)
            stages.append(Stage(config, index, grid=grid, in_width=width, **shape, rngs=rngs, param_dtype=dtype))
            width = shape["width"]
        self.stages = nnx.List(stages)
        self.final_norm = LayerNorm(config.final_width, eps=config.norm_eps, param_dtype=dtype)
        # Zero-initialised head (big_vision's `head_zeroinit`): every class starts equally likely.
        self.head_dc = nnx.Param(jnp.zeros((config.final_width, config.num_classes), dtype))
        self.head_bias_c = nnx.Param(jnp.zeros((config.num_classes,), dtype))

    def named_blocks(self) -> Iterator[tuple[str, EncoderBlock]]:
        """(name, block) in order, with the names used in the intermediates."""
        for s, stage in enumerate(self.stages):
            for i, block in enumerate(stage.blocks):
                yield self._block_name(s, i), block

    def _block_name(self, stage: int, block: int) -> str:
        return f"stage_{stage}/block_{block}" if self.hierarchical else f"block_{block}"

    def embed(self, images: jax.Array) -> jax.Array:
        """images [B, H, W, C] -> tokens [B, T, D]: patches (row-major), CLS token first if any, positions added."""
        if images.shape[1:] != (*self.image_hw, self.channels):
            raise ValueError(f"ViT: expected images [B, {self.image_hw[0]}, {self.image_hw[1]}, {self.channels}], "
                             f"got {list(images.shape)}")
        x = self.patch_embed(images)
        if self.position == "sincos":
            x = x + jnp.asarray(sincos_2d(x.shape[-1], self.stages[0].grid), x.dtype)
        if self.cls_token_d is not None:
            cls = jnp.broadcast_to(self.cls_token_d[...].astype(x.dtype), (x.shape[0], 1, x.shape[-1]))
            x = jnp.concatenate([cls, x], axis=1)
        if self.position_td is not None:
            x = x + self.position_td[...]
        return x

    def __call__(self, images: jax.Array, *, return_intermediates: bool = False):
        intermediates: dict[str, jax.Array] = {}
        x = self.embed(images)
        intermediates["embedded"] = x
        for s, stage in enumerate(self.stages):
            if stage.merge is not None:
                previous = self.stages[s - 1].grid
                grid = stage.merge(x.reshape(x.shape[0], *previous, x.shape[-1]))
                x = grid.reshape(x.shape[0], -1, grid.shape[-1])
            if stage.position_td is not None:
                x = x + stage.position_td[...].astype(x.dtype)
            for i, block in enumerate(stage.blocks):
                x = block(constrain(x, "btd"), intermediates, self._block_name(s, i))
            if stage.output_norm is not None:
                x = stage.output_norm(x)
            if self.hierarchical:
                intermediates[f"stage_{s}/output"] = x.reshape(x.shape[0], *stage.grid, x.shape[-1])
        x = self.final_norm(x)
        intermediates["encoded"] = x
        pooled = x[:, 0] if self.pooling == "cls" else jnp.mean(x, axis=1)
        intermediates["pre_logits"] = pooled
        logits = (jnp.einsum("bd,dc->bc", pooled, self.head_dc[...]) + self.head_bias_c[...]).astype(jnp.float32)
        return (logits, intermediates) if return_intermediates else logits


def attention_maps(model: ViT, images: jax.Array) -> dict[str, jax.Array]:
    """{block name: softmax attention map [B, N, T, T]} of every block, from the block's own attention input.

    Softmax layers only (see `Attention.attention_probabilities`); rows sum to one. For a CLS model, row 0 of each
    map is where the class token looks, and columns 1: are the patches in row-major grid order.
    """
    _, intermediates = model(images, return_intermediates=True)
    return {name: block.attention.attention_probabilities(intermediates[f"{name}/attention_input"])
            for name, block in model.named_blocks() if block.attention is not None}


def count_parameters(model: nnx.Module) -> int:
    """Number of scalars in the model's nnx.Param variables (works on `nnx.eval_shape` results too)."""
    return int(sum(np.prod(p.shape) for p in jax.tree.leaves(nnx.state(model, nnx.Param))))
