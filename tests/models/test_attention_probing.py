"""Probing hooks of the shared attention layer (models/layers/attention.py): captured softmax maps and per-head
masks, on the three families; off by default, outside the parameter tree."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from models.dit import DiT, DiTConfig
from models.layers.attention import attention_layers, capture_attention_probabilities, set_head_masks
from models.llm import LLM, llm_config
from models.vit import ViT, ViTConfig, attention_maps

TOKENS = (jnp.arange(12)[None] * 7) % 50


def llm(scan: bool = False) -> LLM:
    return LLM(llm_config("tiny", width=32, depth=2, num_heads=2, num_kv_heads=1, mlp_width=64, scan_layers=scan),
               rngs=nnx.Rngs(0))


@pytest.mark.parametrize("scan", [False, True])
def test_llm_capture_returns_causal_row_stochastic_maps_and_leaves_the_output_alone(scan):
    model = llm(scan)
    params_before = jax.tree.map(np.asarray, nnx.state(model, nnx.Param))
    plain = model(TOKENS)
    out, maps = jax.jit(capture_attention_probabilities)(model, TOKENS)
    np.testing.assert_allclose(out, plain, rtol=1e-5, atol=1e-5)  # jit vs eager rounding only
    assert list(maps) == ["blocks.0.attention", "blocks.1.attention"]
    for probs in maps.values():
        assert probs.shape == (1, 2, 12, 12)
        np.testing.assert_allclose(probs.sum(-1), 1.0, rtol=1e-5)
        np.testing.assert_array_equal(np.triu(np.asarray(probs[0, 0]), 1), 0)
    jax.tree.map(np.testing.assert_array_equal, params_before, jax.tree.map(np.asarray, nnx.state(model, nnx.Param)))
    assert not nnx.state(model, nnx.Intermediate)  # nothing sown on the caller's model


def test_vit_capture_matches_attention_maps():
    config = ViTConfig(image_size=(8, 8), patch_size=4, channels=1, num_classes=3, width=16, depth=2, num_heads=2)
    model = ViT(config, rngs=nnx.Rngs(0))
    images = jax.random.uniform(jax.random.key(0), (2, 8, 8, 1))
    _, maps = capture_attention_probabilities(model, images)
    reference = attention_maps(model, images)
    assert len(maps) == len(reference) == 2
    for got, want in zip(maps.values(), reference.values()):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_dit_capture_sees_every_block():
    model = DiT(DiTConfig(input_size=4, patch_size=2, in_channels=1, num_classes=3, width=12, depth=2, num_heads=2),
                rngs=nnx.Rngs(0))
    _, maps = capture_attention_probabilities(model, jnp.zeros((1, 4, 4, 1)), jnp.array([3]), jnp.array([1]))
    assert len(maps) == 2 and all(m.shape == (1, 2, 4, 4) for m in maps.values())


def test_head_masks_of_ones_are_the_identity_and_zeroing_a_head_changes_only_masked_layers():
    model = llm()
    plain = model(TOKENS)
    set_head_masks(model, jnp.ones((2, 2)))
    np.testing.assert_allclose(model(TOKENS), plain, rtol=1e-6, atol=1e-6)
    params = {".".join(map(str, p)) for p, _ in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    assert not any("head_mask" in name for name in params)  # not a parameter
    set_head_masks(model, jnp.array([[0.0, 1.0], [1.0, 1.0]]))
    assert float(jnp.max(jnp.abs(model(TOKENS) - plain))) > 1e-3
    # zeroing every head of a layer = that layer's attention contributes only its (absent) output bias
    layer = attention_layers(model)[0][1]
    x = jax.random.normal(jax.random.key(0), (1, 5, 32))
    set_head_masks(model, jnp.zeros((2, 2)))
    np.testing.assert_allclose(layer(x), 0.0, atol=1e-7)
    set_head_masks(model, None)
    np.testing.assert_allclose(model(TOKENS), plain, rtol=1e-6, atol=1e-6)


def test_head_mask_errors_name_the_argument():
    model = llm()
    with pytest.raises(ValueError, match="set_head_masks.masks: expected one"):
        set_head_masks(model, jnp.ones((3, 2)))
    with pytest.raises(ValueError, match=r"2 heads, expected a mask of shape \(2,\)"):
        set_head_masks(model, jnp.ones((2, 3)))


def test_head_masks_apply_to_cached_decoding_too():
    """An ablated model decodes as it runs whole sequences (retrieval-head ablations decode with a cache)."""
    model = llm()
    set_head_masks(model, jnp.array([[1.0, 0.0], [0.5, 1.0]]))
    full = model(TOKENS)
    cache = model.init_cache(1, 12)
    prefix, cache = model.decode(TOKENS[:, :8], cache, jnp.int32(0))
    rest, _ = model.decode(TOKENS[:, 8:], cache, jnp.int32(8))
    np.testing.assert_allclose(jnp.concatenate([prefix, rest], axis=1), full, rtol=1e-4, atol=1e-4)
