"""MoH inside the attention layer: the router's weights, the balance loss reaching the task loss, the MHA limit,
and errors for missing or misfitting options."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import attnx
from attnx import registry
from models.layers.attention import Attention
from models.layers.mixers import call_with_auxiliary_loss
from models.llm import LLM, LLMConfig
from train.language_model import ByteLanguageModel

X = jax.random.normal(jax.random.key(0), (2, 5, 24))


def layer(rngs_seed=1, **kind_kwargs):
    return Attention(24, 4, 2, 6, kind="moh", kind_kwargs=kind_kwargs, causal=True, rngs=nnx.Rngs(rngs_seed))


def test_all_shared_heads_with_a_zero_router_equal_the_softmax_layer():
    moh = layer(n_shared=4, top_k=0)
    moh.router.shared_ds[...] = jnp.zeros_like(moh.router.shared_ds[...])
    plain = Attention(24, 4, 2, 6, causal=True, rngs=nnx.Rngs(1))
    np.testing.assert_allclose(moh(X), plain(X), rtol=1e-5, atol=1e-6)


def test_router_shapes_and_param_free_owns_no_router():
    moh = layer(n_shared=1, top_k=2)
    assert moh.router.routed_dr.shape == (24, 3) and moh.router.mix_d2.shape == (24, 2)
    assert moh.router.shared_ds is None  # one shared head: its gate is 1 before mixing
    free = layer(n_shared=2, top_k=1, param_free=True)
    assert not nnx.state(free.router, nnx.Param)


@pytest.mark.slow  # default-suite time budget: trains; the balance loss itself is tested in tests/attnx/test_moh.py
def test_balance_loss_is_weighted_added_and_trains_the_router():
    config = LLMConfig(width=24, depth=2, num_heads=4, num_kv_heads=2, mlp_width=40, attention="moh",
                       attention_kwargs={"n_shared": 1, "top_k": 2, "balance_weight": 0.5})
    model = LLM(config, rngs=nnx.Rngs(2))
    tokens = jax.random.randint(jax.random.key(3), (2, 6), 0, 256)
    _, auxiliary = call_with_auxiliary_loss(model, tokens[:, :-1])
    assert 0.5 * 1.0 < float(auxiliary) < 0.5 * 3.0 + 1e-6  # k=2 routed of 3: L_b in [k·k/E.., E], ~k when balanced
    task = ByteLanguageModel(model=config)
    loss, metrics = nnx.jit(lambda m, t: task.loss_fn(m, {"tokens": t}))(model, tokens)  # compiled: eager is slow
    np.testing.assert_allclose(loss, metrics["bits_per_byte"] * np.log(2) + metrics["auxiliary_loss"], rtol=1e-6)
    graphdef, params = nnx.split(model, nnx.Param)
    grads = jax.jit(jax.grad(lambda p: task.loss_fn(nnx.merge(graphdef, p), {"tokens": tokens})[0]))(params)
    assert float(jnp.abs(grads["blocks"][0]["attention"]["router"]["routed_dr"][...]).max()) > 0
    # Plain inference records nothing (sowing happens only under nnx.capture).
    model(tokens)
    assert not nnx.state(model, nnx.Intermediate)


def test_missing_or_misfitting_options_are_named(monkeypatch):
    with pytest.raises(ValueError, match="moh needs attention_kwargs n_shared"):
        layer()
    with pytest.raises(ValueError, match="top_k: expected 0 <= top_k <= 3 routed heads"):
        layer(n_shared=1, top_k=4)
    causal_only = dataclasses.replace(attnx.get_attention("softmax"), name="causal_only", aliases=(),
                                      patterns=frozenset({"CS"}))
    monkeypatch.setitem(registry._REGISTRY, "causal_only", causal_only)
    with pytest.raises(ValueError, match="'causal_only' does not support non-causal"):
        Attention(24, 4, 2, 6, kind="moh", kind_kwargs={"n_shared": 2, "top_k": 1, "core": "causal_only"},
                  causal=False, rngs=nnx.Rngs(0))


@pytest.mark.parametrize("family", ["vit", "dit"])
def test_vision_tasks_add_the_balance_loss(family):
    """MoH in ViT and DiT (spec vision §10, diffusion §5): the tasks' losses include the weighted balance loss."""
    from models.dit import DiT, DiTConfig
    from models.vit import ViT, ViTConfig
    from train.data.digits import DigitsData
    from train.image_classification import ImageClassification
    from train.image_diffusion import ClassConditionalDiffusion

    moh = dict(attention="moh", attention_kwargs={"n_shared": 1, "top_k": 1, "balance_weight": 1.0})
    batch = {"image": jax.random.uniform(jax.random.key(0), (4, 8, 8, 1)), "label": jnp.arange(4)}
    if family == "vit":
        config = ViTConfig(patch_size=4, width=24, depth=1, num_heads=3, mlp_width=16, **moh)
        task, model = ImageClassification(model=config, data=DigitsData(batch_size=4)), ViT(config, rngs=nnx.Rngs(0))
    else:
        config = DiTConfig(patch_size=4, width=24, depth=1, num_heads=3, **moh)
        task = ClassConditionalDiffusion(model=config, data=DigitsData(batch_size=4), num_timesteps=40,
                                         sampling_steps=4)
        model = DiT(config, rngs=nnx.Rngs(0))
    loss, metrics = nnx.jit(task.loss_fn)(model, batch, jax.random.key(1))  # compiled: eager NNX is slow
    # Two routed heads, top-1: L_b = 2 sum_i f_i P_i is 1 when balanced and at most 2 (weight 1.0 here).
    assert 1.0 - 1e-5 <= float(metrics["auxiliary_loss"]) <= 2.0 + 1e-5
    assert float(loss) > float(metrics["auxiliary_loss"])
