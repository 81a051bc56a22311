"""Neighbourhood and halo attention in the models: the shared attention layer hands the grid and the relative weights
of models/layers/mixers/relative_bias.py to the attnx functions; a tiny DiT and a tiny hierarchical ViT run with them
(per-stage grids), and a class token is refused with the pooling hint."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from attnx.ops.local.halo import halo_reference
from attnx.ops.local.neighborhood import neighborhood_reference
from attnx.testing.tolerances import assert_close
from models.dit import DiT, dit_config
from models.layers.attention import Attention
from models.vit import ViT, ViTStage, vit_config

GRID = (4, 6)
X = jax.random.normal(jax.random.key(0), (2, 24, 16))
LOCAL = {"neighborhood": {"kernel_size": (3, 5), "dilation": (1, 1), "use_rpb": True},
         "halo": {"block_size": 2, "halo_size": 1}}


def random_parameters(build, seed, scale=1.0):
    """(graphdef, state) of the module built abstractly, every parameter drawn in numpy (no initializer compiles);
    at unit scale the relative weights (initialised small) change the output."""
    graphdef, state = nnx.split(nnx.eval_shape(build))
    rng = np.random.default_rng(seed)
    return graphdef, jax.tree.map(lambda x: jnp.asarray(scale * rng.standard_normal(x.shape), jnp.float32), state)


LAYERS = {kind: random_parameters(lambda: Attention(16, 4, 2, 4, kind=kind, kind_kwargs=LOCAL[kind], causal=False,
                                                    use_rope=False, use_bias=True, grid=GRID, rngs=nnx.Rngs(0)), seed)
          for seed, kind in enumerate(LOCAL)}


@jax.jit
def layers_and_references(states):
    results = {}
    for kind, kwargs in LOCAL.items():
        layer = nnx.merge(LAYERS[kind][0], states[kind])
        query, key, value = layer.project_heads(X)
        if kind == "neighborhood":
            weights = {"rpb": layer.router.rpb[...]}
            mixed = neighborhood_reference(query, key, value, grid=GRID, **{**kwargs, **weights})
        else:
            weights = {"rel": (layer.router.rel_0[...], layer.router.rel_1[...])}
            mixed = halo_reference(query, key, value, grid=GRID, **{**kwargs, **weights})
        results[kind] = (layer(X), layer.output(mixed), jax.tree.map(jnp.shape, weights))
    return results


def test_layer_passes_grid_and_relative_weights():
    results = layers_and_references({kind: state for kind, (_, state) in LAYERS.items()})
    for kind, (got, want, shapes) in results.items():
        assert_close(got, want, jnp.float32, what=kind)
    assert results["neighborhood"][2] == {"rpb": (4, 5, 9)}  # per query head, 2k - 1 per axis
    assert results["halo"][2] == {"rel": ((7, 4), (7, 4))}  # per axis, 2 (b + 2h) - 1 rows of the head dim


def test_neighborhood_without_rpb_owns_no_weights():
    layer = nnx.eval_shape(lambda: Attention(16, 4, 2, 4, kind="neighborhood", kind_kwargs={"kernel_size": 3},
                                             causal=False, use_rope=False, grid=GRID, rngs=nnx.Rngs(0)))
    assert layer.router.rpb is None


def test_tiny_dit_runs_with_local_attention():
    config = dit_config("tiny", patch_size=2, width=16, depth=2, num_heads=2,
                        layer_attention=(("neighborhood", {"kernel_size": 3, "use_rpb": True}),
                                         ("halo", LOCAL["halo"])))
    graphdef, state = random_parameters(lambda: DiT(config, rngs=nnx.Rngs(0)), seed=3, scale=0.3)
    model = nnx.merge(graphdef, state)
    assert [type(block.attention.router).__name__ for block in model.blocks] == ["NeighborhoodBias",
                                                                                  "HaloRelativeEmbedding"]
    assert model.blocks[0].attention.grid == (4, 4)
    images = jax.random.normal(jax.random.key(1), (2, 8, 8, 1))
    run = jax.jit(lambda s: nnx.merge(graphdef, s)(images, jnp.array([3, 500]), jnp.array([1, 7])))
    out = run(state)
    assert out.shape == (2, 8, 8, 2) and np.isfinite(out).all() and float(jnp.std(out)) > 0


def test_hierarchical_vit_builds_with_per_stage_local_attention():
    config = vit_config("tiny_hierarchical", width=16, depth=1, num_heads=2, mlp_width=32, attention="halo",
                        attention_kwargs={"block_size": 4, "halo_size": 1},
                        stages=(ViTStage(width=16, depth=1, num_heads=2, mlp_width=32, attention="neighborhood",
                                         attention_kwargs={"kernel_size": 3, "use_rpb": True}),))
    logits = jax.eval_shape(lambda x: ViT(config, rngs=nnx.Rngs(0))(x), jnp.zeros((2, 8, 8, 1)))
    assert logits.shape == (2, 10)


def test_class_token_is_refused_with_the_pooling_hint():
    config = vit_config("tiny", patch_size=2, width=16, depth=1, num_heads=2, mlp_width=32, pooling="cls",
                        attention="neighborhood", attention_kwargs={"kernel_size": 3})
    with pytest.raises(ValueError, match="pooling='mean'"):
        jax.eval_shape(lambda x: ViT(config, rngs=nnx.Rngs(0))(x), jnp.zeros((1, 8, 8, 1)))


def test_causal_1d_neighborhood_decodes_like_the_full_forward():
    """In an LLM layer (rotary positions, RPB from the router): prefill then single steps == the full forward."""
    graphdef, state = random_parameters(
        lambda: Attention(16, 4, 2, 4, kind="neighborhood", causal=True, rngs=nnx.Rngs(0),
                          kind_kwargs={"kernel_size": 3, "dilation": 2, "use_rpb": True}), seed=4, scale=0.5)
    x = jax.random.normal(jax.random.key(5), (2, 7, 16))

    @jax.jit
    def full_and_steps(state):
        layer = nnx.merge(graphdef, state)
        cache = layer.init_cache(2, 9)  # longer than the sequence: unwritten slots must not be attended
        prefill, cache = layer.decode(x[:, :5], cache, jnp.int32(0))
        steps = [prefill]
        for position in (5, 6):
            step, cache = layer.decode(x[:, position:position + 1], cache, jnp.int32(position))
            steps.append(step)
        return layer(x), jnp.concatenate(steps, axis=1)

    full, decoded = full_and_steps(state)
    assert_close(decoded, full, jnp.float32)
