"""The ViT family: presets (shapes and published parameter counts, abstractly), intermediates and attention maps,
pooling and position options, the hierarchical variant with per-stage attention, and config validation."""

import pathlib

import gin
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import attnx
from attnx import registry
from models.layers.patch import sincos_2d
from models.layers.vision import PatchMerging
from models.vit import PRESETS, ViT, ViTConfig, ViTStage, attention_maps, count_parameters, vit_config
from train import gin_config

CONFIG_DIR = pathlib.Path(__file__).resolve().parents[2] / "configs"

# Distinct sizes per axis (ARCHITECTURE §7): B=3 images of 8x12 pixels with C=2 channels, patch 2 -> a 4x6 grid
# (P=24 patches, T=25 tokens with CLS), width D=24 in N=2 heads of H=12, MLP F=40, 5 classes.
CONFIG = ViTConfig(image_size=(8, 12), patch_size=2, channels=2, num_classes=5, width=24, depth=2, num_heads=2,
                   mlp_width=40)
HIERARCHICAL = ViTConfig(image_size=(8, 12), patch_size=2, channels=2, num_classes=5, width=16, depth=1,
                         num_heads=2, mlp_width=24, pooling="mean",
                         stages=(ViTStage(width=28, depth=1, num_heads=4, mlp_width=36),))

# Published totals: timm vit_{tiny,small,base,large}_patch16_224 with the 1000-class head (timm's param counts).
PUBLISHED_PARAMETERS = {"Ti/16": 5_717_416, "S/16": 22_050_664, "B/16": 86_567_656, "L/16": 304_326_632,
                        # the mechanism papers' small models, as their tables round them (0.1M)
                        "nat_mini": 20.0e6, "crossformer_t": 27.8e6, "transnext_micro": 12.8e6, "litv2_s": 28.0e6,
                        "inline_deit_t": 6.5e6}
# The four-stage paper models trace for 10-30 s each: their forward shapes run with `-m slow` (their parameter
# counts, which build them abstractly, stay in the default suite).
PAPER_MODELS = ("nat_mini", "crossformer_t", "transnext_micro", "litv2_s", "inline_deit_t", "inline_swin_t",
                "inline_pvt_t", "transnext_small", "transnext_base", "moh_vit_s_75", "moh_vit_s_80", "moh_vit_b_75",
                "moh_vit_b_50")


def images(config: ViTConfig, batch: int = 3, seed: int = 0) -> jax.Array:
    return jax.random.uniform(jax.random.key(seed), (batch, *config.image_hw, config.channels))


@pytest.fixture(scope="module")
def model():
    return ViT(CONFIG, rngs=nnx.Rngs(0))


@pytest.fixture(scope="module")
def probed(model):
    """(logits, intermediates, attention maps) of one jitted call on CONFIG-shaped images."""

    @nnx.jit
    def run(model, x):
        logits, intermediates = model(x, return_intermediates=True)
        return logits, intermediates, attention_maps(model, x)

    return run(model, images(CONFIG))


# ---- Presets ----

@pytest.mark.parametrize("preset", [pytest.param(name, marks=pytest.mark.slow) if name in PAPER_MODELS else name
                                    for name in sorted(PRESETS)])
def test_every_preset_gives_logits_of_its_shape_abstractly(preset):
    config = PRESETS[preset]

    def forward():  # traced only: no parameter of the large presets is allocated
        return ViT(config, rngs=nnx.Rngs(0))(jnp.zeros((2, *config.image_hw, config.channels)))

    logits = jax.eval_shape(forward)
    assert logits.shape == (2, config.num_classes) and logits.dtype == jnp.float32


@pytest.mark.parametrize("preset", sorted(PUBLISHED_PARAMETERS))
def test_parameter_counts_match_the_published_models(preset):
    abstract = nnx.eval_shape(lambda: ViT(PRESETS[preset], rngs=nnx.Rngs(0)))
    published = PUBLISHED_PARAMETERS[preset]
    assert abs(count_parameters(abstract) - published) <= 0.01 * published, (count_parameters(abstract), published)


def test_presets_have_the_published_shapes():
    shapes = {name: (c.width, c.depth, c.num_heads, c.mlp_width, c.patch_size, c.image_size, c.num_classes)
              for name, c in PRESETS.items() if "/" in name}
    assert shapes == {"Ti/16": (192, 12, 3, 768, 16, 224, 1000), "S/16": (384, 12, 6, 1536, 16, 224, 1000),
                      "B/16": (768, 12, 12, 3072, 16, 224, 1000), "L/16": (1024, 24, 16, 4096, 16, 224, 1000)}
    assert all(PRESETS[name].pooling == "cls" and PRESETS[name].position == "learned" for name in shapes)


def test_preset_lookup_and_overrides():
    assert vit_config("tiny") == ViTConfig()
    assert vit_config("B/16", num_classes=10).num_classes == 10
    with pytest.raises(ValueError, match="unknown ViT preset 'H/14'.*B/16"):
        vit_config("H/14")


@pytest.mark.parametrize("size_file, preset", [("Ti_16", "Ti/16"), ("S_16", "S/16"), ("B_16", "B/16"),
                                               ("L_16", "L/16"), ("tiny", "tiny")])
def test_gin_size_files_set_the_preset_shapes(size_file, preset):
    """tests/configs builds these files with tiny macros; here their own macro values are checked (nothing built)."""
    gin_config.parse([str(CONFIG_DIR / "experiments/vit_digits.gin"),
                      str(CONFIG_DIR / f"models/vit/{size_file}.gin")], [])
    try:
        macros = {name: gin.query_parameter(f"{name}/macro.value")
                  for name in ("WIDTH", "DEPTH", "NUM_HEADS", "MLP_WIDTH", "PATCH_SIZE")}
    finally:
        gin.clear_config()
    config = PRESETS[preset]
    assert macros == {"WIDTH": config.width, "DEPTH": config.depth, "NUM_HEADS": config.num_heads,
                      "MLP_WIDTH": config.mlp_width, "PATCH_SIZE": config.patch_size}


# ---- Forward pass, intermediates, attention maps ----

def test_intermediates_are_named_and_shaped(probed):
    logits, intermediates, _ = probed
    batch, tokens, width = 3, 25, 24
    assert logits.shape == (batch, 5) and logits.dtype == jnp.float32
    expected = {"embedded": (batch, tokens, width), "encoded": (batch, tokens, width), "pre_logits": (batch, width)}
    for block in range(2):
        expected[f"block_{block}/attention_input"] = expected[f"block_{block}/output"] = (batch, tokens, width)
    assert {name: value.shape for name, value in intermediates.items()} == expected


def test_attention_maps_are_row_stochastic_per_block_and_head(probed):
    _, _, maps = probed
    assert sorted(maps) == ["block_0", "block_1"]
    for probabilities in maps.values():
        assert probabilities.shape == (3, 2, 25, 25)
        assert float(probabilities.min()) >= 0
        np.testing.assert_allclose(probabilities.sum(-1), 1.0, rtol=1e-5)


def test_attention_map_is_what_the_layer_computes(model, probed):
    """The probed map, applied to the layer's values, reproduces the layer's output (the map is not a lookalike)."""
    _, intermediates, maps = probed
    attention = model.stages[0].blocks[0].attention
    x = intermediates["block_0/attention_input"]
    _, _, value = attention.project(x)
    mixed = jnp.einsum("bnts,bsnh->btnh", maps["block_0"], value)
    np.testing.assert_allclose(attention.output(mixed), attention(x), rtol=1e-4, atol=1e-5)


def test_wrong_image_shape_is_a_clear_error(model):
    with pytest.raises(ValueError, match=r"expected images \[B, 8, 12, 2\], got \[3, 12, 8, 2\]"):
        model(jnp.zeros((3, 12, 8, 2)))


# ---- Pooling and positions ----

def test_cls_pooling_reads_the_class_token_and_mean_pooling_averages(probed):
    _, intermediates, _ = probed
    np.testing.assert_array_equal(intermediates["pre_logits"], intermediates["encoded"][:, 0])
    config = ViTConfig(**{**CONFIG.__dict__, "pooling": "mean", "depth": 1})
    mean_model = ViT(config, rngs=nnx.Rngs(0))
    assert mean_model.cls_token_d is None and mean_model.position_td.shape == (24, 24)  # no class token
    _, mean_intermediates = mean_model(images(config), return_intermediates=True)
    assert mean_intermediates["encoded"].shape == (3, 24, 24)
    np.testing.assert_allclose(mean_intermediates["pre_logits"], mean_intermediates["encoded"].mean(1), rtol=1e-6)


def test_learned_positions_cover_the_class_token_and_sincos_adds_the_fixed_table():
    learned = nnx.eval_shape(lambda: ViT(CONFIG, rngs=nnx.Rngs(0)))
    assert learned.position_td.shape == (25, 24)  # P + 1 rows, timm's layout
    config = ViTConfig(**{**CONFIG.__dict__, "position": "sincos"})
    sincos = ViT(config, rngs=nnx.Rngs(0))
    assert sincos.position_td is None
    x = images(config)
    embedded = sincos.embed(x)
    np.testing.assert_allclose(embedded[:, 1:] - sincos.patch_embed(x), np.broadcast_to(sincos_2d(24, (4, 6)),
                                                                                         (3, 24, 24)), atol=1e-5)
    np.testing.assert_array_equal(embedded[:, 0], np.zeros((3, 24)))  # the class token gets no position


# ---- Hierarchical variant ----

def test_hierarchical_shapes_merge_the_grid_and_pool_the_mean():
    model = ViT(HIERARCHICAL, rngs=nnx.Rngs(0))
    logits, intermediates = nnx.jit(lambda m, x: m(x, return_intermediates=True))(model, images(HIERARCHICAL))
    assert logits.shape == (3, 5)
    shapes = {name: value.shape for name, value in intermediates.items()}
    assert shapes["stage_0/block_0/attention_input"] == (3, 24, 16)
    assert shapes["stage_0/output"] == (3, 4, 6, 16)
    assert shapes["stage_1/block_0/attention_input"] == (3, 6, 28)
    assert shapes["stage_1/output"] == (3, 2, 3, 28)
    assert shapes["pre_logits"] == (3, 28)
    assert [stage.grid for stage in model.stages] == [(4, 6), (2, 3)]
    assert model.stages[0].merge is None and model.stages[1].merge.reduction_fd.shape == (64, 28)


def test_patch_merging_concatenates_each_2x2_cell_in_row_major_order():
    merge = PatchMerging(3, 5, norm_eps=1e-6, rngs=nnx.Rngs(0), param_dtype=jnp.float32)
    grid = jax.random.normal(jax.random.key(1), (2, 4, 6, 3))
    cells = jnp.concatenate([grid[:, 0::2, 0::2], grid[:, 0::2, 1::2], grid[:, 1::2, 0::2], grid[:, 1::2, 1::2]],
                            axis=-1)
    expected = jnp.einsum("bhwf,fd->bhwd", merge.norm(cells), merge.reduction_fd[...])
    np.testing.assert_allclose(merge(grid), expected, rtol=1e-5, atol=1e-6)


# Slow: configuration plumbing also exercised by the presets' tests.
@pytest.mark.slow
def test_per_stage_attention_reaches_the_layers_and_changes_the_output():
    local = ViTConfig(**{**HIERARCHICAL.__dict__, "stages": (
        ViTStage(width=28, depth=1, num_heads=4, mlp_width=36, attention="sliding_window",
                 attention_kwargs={"window": 1}),)})
    mixed, plain = ViT(local, rngs=nnx.Rngs(0)), ViT(HIERARCHICAL, rngs=nnx.Rngs(0))
    kinds = [(block.attention.kind, dict(block.attention.kind_kwargs)) for _, block in mixed.named_blocks()]
    assert kinds == [("softmax", {}), ("sliding_window", {"window": 1})]
    x = images(HIERARCHICAL)
    # Same parameters (same seed, same shapes); only the second stage's mechanism differs. (Compared before the
    # head, which starts at zero.)
    _, mixed_intermediates = mixed(x, return_intermediates=True)
    _, plain_intermediates = plain(x, return_intermediates=True)
    np.testing.assert_array_equal(mixed_intermediates["stage_0/output"], plain_intermediates["stage_0/output"])
    assert not np.allclose(mixed_intermediates["pre_logits"], plain_intermediates["pre_logits"], atol=1e-3)


def test_stages_inherit_the_model_attention_unless_they_name_their_own():
    config = ViTConfig(**{**HIERARCHICAL.__dict__, "attention": "sliding_window",
                          "attention_kwargs": {"window": 2}})
    assert config.stage_attention(1) == ("sliding_window", {"window": 2})
    own = ViTConfig(**{**config.__dict__, "stages": (ViTStage(width=28, depth=1, num_heads=4, attention="softmax",
                                                              attention_kwargs={}),)})
    assert own.stage_attention(1) == ("softmax", {})
    assert own.stages[0].resolved_mlp_width == 4 * 28


# Slow: configuration plumbing also exercised by the presets' tests.
@pytest.mark.slow
def test_layer_attention_alternates_blocks_and_stages_can_drop_attention():
    """CrossFormer alternates SDA/LDA blocks, DiNAT dilations: per-block entries repeat over a stage's blocks.
    LITv2's first stages have no attention: use_attention=False leaves MLP-only blocks."""
    window = ("sliding_window", {"window": 1})
    config = vit_config("tiny_hierarchical", layer_attention=(None, window), use_attention=True, stages=(
        ViTStage(width=64, depth=3, num_heads=4, mlp_width=128, layer_attention=[window, "softmax"]),))
    assert config.stages[0].layer_attention == (window, "softmax")
    model = nnx.eval_shape(lambda: ViT(config, rngs=nnx.Rngs(0)))
    kinds = [(block.attention.kind, dict(block.attention.kind_kwargs)) for _, block in model.named_blocks()]
    assert kinds == [("softmax", {}), ("sliding_window", {"window": 1}),
                     ("sliding_window", {"window": 1}), ("softmax", {}), ("sliding_window", {"window": 1})]
    mlp_only = vit_config("tiny_hierarchical", use_attention=False)
    model = ViT(mlp_only, rngs=nnx.Rngs(0))
    assert [block.attention for block in model.stages[0].blocks] == [None, None]
    assert model.stages[1].blocks[0].attention is not None
    logits, intermediates = model(jnp.ones((1, 8, 8, 1)), return_intermediates=True)
    assert logits.shape == (1, 10) and "stage_0/block_0/attention_input" not in intermediates
    assert set(attention_maps(model, jnp.ones((1, 8, 8, 1)))) == {"stage_1/block_0", "stage_1/block_1"}


# ---- Validation ----

@pytest.mark.parametrize("overrides, message", [
    (dict(pooling="max"), r"ViTConfig.pooling='max'; allowed: \['cls', 'mean'\]"),
    (dict(position="rope"), r"ViTConfig.position='rope'; allowed: \['learned', 'sincos', 'none'\]"),
    (dict(patch_size=3), r"image_size=8 is not divisible by patch_size=3"),
    (dict(width=30), r"ViTConfig.width=30 is not divisible by num_heads=4"),
    (dict(depth=0), r"ViTConfig.depth must be a positive int, got 0"),
    (dict(image_size=(8,)), r"ViTConfig.image_size must be a positive int or \(height, width\)"),
    (dict(position="sincos", width=6, num_heads=2), r"sincos' needs a width divisible by 4, got width=6"),
    (dict(param_dtype="float64"), r"ViTConfig.param_dtype='float64'; allowed: \['bfloat16', 'float32'\]"),
    (dict(attention="no_such_mechanism"), r"ViTConfig.attention='no_such_mechanism'.*known: .*softmax"),
    (dict(attention_kwargs=[("window", 2)]), r"ViTConfig.attention_kwargs must be a dict"),
    (dict(stages=(ViTStage(width=64, depth=1, num_heads=4),)), r"pooling='cls' with stages.*allowed: \['mean'\]"),
    (dict(pooling="mean", patch_size=1, stages=(ViTStage(64, 1, 4),) * 4),
     r"stages\[3\]: 2x2 patch merging needs an even token grid, but the grid before this stage is 1x1"),
    (dict(pooling="mean", stages=(ViTStage(width=30, depth=1, num_heads=4),)),
     r"ViTConfig.stages\[0\].width=30 is not divisible by num_heads=4"),
    (dict(pooling="mean", stages=(ViTStage(width=32, depth=1, num_heads=4, attention="nope"),)),
     r"ViTConfig.stages\[0\].attention='nope'.*known: .*sliding_window"),
    (dict(embed="conv7"), r"ViTConfig.embed='conv7': unknown; known embeddings: \[.*'patch'"),
    (dict(mlp="swiglu"), r"ViTConfig.mlp='swiglu': unknown; known MLPs: \[.*'gelu'"),
    (dict(pooling="mean", stages=(ViTStage(64, 1, 4, merge="pool"),)), r"stages\[0\].merge='pool': unknown"),
    (dict(layer_attention=(None, 7)), r"ViTConfig.layer_attention entry 7: expected None"),
    (dict(layer_attention=(None, "nope")), r"ViTConfig.layer_attention\[1\].attention='nope'"),
    (dict(use_attention="no"), r"ViTConfig.use_attention must be a bool"),
])
def test_bad_config_values_are_clear_errors(overrides, message):
    with pytest.raises(ValueError, match=message):
        vit_config("tiny", **overrides)


def test_a_mechanism_without_non_causal_self_attention_is_refused_per_stage(monkeypatch):
    softmax = attnx.get_attention("softmax")
    causal_only = registry.AttentionSpec(name="causal_only_for_test", fn=softmax.fn, reference=softmax.reference,
                                         patterns=frozenset({"CS"}), paper="test double")
    monkeypatch.setitem(registry._REGISTRY, causal_only.name, causal_only)
    with pytest.raises(ValueError, match=r"ViTConfig.attention='causal_only_for_test'.*does not support non-causal"):
        vit_config("tiny", attention="causal_only_for_test")
    with pytest.raises(ValueError, match=r"ViTConfig.stages\[0\].attention='causal_only_for_test'.*pattern NS"):
        vit_config("tiny_hierarchical", stages=(ViTStage(64, 1, 4, attention="causal_only_for_test"),))
