"""Parity of models/interop/diffusers_dit.py with diffusers' DiTTransformer2DModel (random init, every weight
randomised: DiT zero-initialises its adaLN and output layers) and with the original DiT naming (round trip, and
original -> diffusers names -> the diffusers model's outputs)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from models.dit import DiT  # noqa: E402
from models.interop.diffusers_dit import (config_from_diffusers, diffusers_max_period,  # noqa: E402
                                          from_diffusers_dit, from_dit_original, to_diffusers_dit,
                                          to_dit_original)

TINY = dict(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=8, num_layers=2,
            sample_size=8, patch_size=2, num_embeds_ada_norm=10)


def _reference():
    torch.manual_seed(0)
    model = diffusers.DiTTransformer2DModel(**TINY).eval()
    with torch.no_grad():
        shared = {}
        for name, p in model.named_parameters():
            key = name.split("norm1.emb.", 1)[-1] if "norm1.emb." in name else None
            if key is not None and key in shared:  # the per-block embedder copies stay equal (a real checkpoint)
                p.copy_(shared[key])
                continue
            # unit-variance activations (1 / sqrt(fan-in)), as a trained network keeps them; biases small
            scale = 1 / np.sqrt(np.prod(p.shape[1:])) if p.ndim > 1 and "embedding_table" not in name else 0.3
            p.copy_(torch.randn_like(p) * float(scale))
            if key is not None:
                shared[key] = p.detach().clone()
    return model


REFERENCE = _reference()
CONFIG = config_from_diffusers(dict(REFERENCE.config))
X = np.random.default_rng(0).normal(size=(2, 4, 8, 8)).astype(np.float32)  # NCHW, as diffusers takes it
T = np.array([3.0, 917.0], np.float32)
Y = np.array([7, 10], np.int64)  # 10: the null class


def _torch_out(model, state=None):
    if state is not None:
        model.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in state.items()}, strict=True)
    with torch.no_grad():
        return model(torch.from_numpy(X), timestep=torch.from_numpy(T), class_labels=torch.from_numpy(Y)).sample.numpy()


@nnx.jit
def _attnx_forward(model, x, t, y):
    return model(x, t, y)


def _attnx_out(state):
    model = nnx.merge(nnx.graphdef(nnx.eval_shape(lambda: DiT(CONFIG, rngs=nnx.Rngs(0)))), state)
    out = _attnx_forward(model, jnp.asarray(X.transpose(0, 2, 3, 1)), jnp.asarray(T), jnp.asarray(Y, jnp.int32))
    return np.asarray(out).transpose(0, 3, 1, 2)


REFERENCE_OUT = _torch_out(REFERENCE)


def _flat(state):
    return {".".join(map(str, k)): np.asarray(v.get_value()) for k, v in nnx.to_flat_state(state)}


def test_config_maps_fields():
    assert (CONFIG.width, CONFIG.depth, CONFIG.num_heads, CONFIG.patch_size, CONFIG.input_size) == (32, 2, 2, 2, 8)
    assert CONFIG.learn_sigma and CONFIG.out_channels == 8 and CONFIG.num_classes == 10
    assert CONFIG.timestep_max_period == diffusers_max_period()


def test_position_embedding_equals_diffusers_buffer():
    ours = DiT.position_embedding.__get__(type("G", (), {"width": 32, "grid_size": 4})())()
    np.testing.assert_allclose(ours, REFERENCE.pos_embed.pos_embed[0].numpy(), atol=1e-6)


def test_from_diffusers_matches_reference_forward(tmp_path):
    REFERENCE.save_pretrained(tmp_path)  # directory: config.json + diffusion_pytorch_model.safetensors
    config, state = from_diffusers_dit(tmp_path)
    assert config == CONFIG
    out = _attnx_out(state)
    assert out.shape == REFERENCE_OUT.shape == (2, 8, 8, 8)
    np.testing.assert_allclose(out, REFERENCE_OUT, atol=1e-4, rtol=1e-4)


def test_to_diffusers_loads_strict_and_matches():
    model = DiT(CONFIG, rngs=nnx.Rngs(1))
    state = nnx.state(model, nnx.Param)
    leaves = []  # every weight random (no adaLN-Zero zeros), at unit-activation scale: 1 / sqrt(fan-in)
    for index, (key, v) in enumerate(nnx.to_flat_state(state)):
        name = key[-1]
        scale = (0.3 if "bias" in name or "embedding" in name else
                 1 / np.sqrt(v.shape[0] * (v.shape[1] if name == "out_nhd" else 1)))
        leaves.append((key, v.replace(scale * jax.random.normal(jax.random.key(index), v.shape))))
    state = nnx.from_flat_state(leaves)
    target = diffusers.DiTTransformer2DModel(**TINY).eval()
    ref = _torch_out(target, to_diffusers_dit(state, CONFIG))
    np.testing.assert_allclose(_attnx_out(state), ref, atol=1e-4, rtol=1e-4)
    back = _flat(from_diffusers_dit(to_diffusers_dit(state, CONFIG), CONFIG)[1])
    for key, value in _flat(state).items():  # round trip: exact
        np.testing.assert_array_equal(back[key], value, err_msg=key)


def test_to_diffusers_writes_a_loadable_directory(tmp_path):
    _, state = from_diffusers_dit(REFERENCE.state_dict(), CONFIG)
    to_diffusers_dit(state, CONFIG, out=tmp_path)
    loaded = diffusers.DiTTransformer2DModel.from_pretrained(tmp_path).eval()
    np.testing.assert_array_equal(_torch_out(loaded), REFERENCE_OUT)


def test_dit_original_round_trip_and_diffusers_names():
    _, state = from_diffusers_dit(REFERENCE.state_dict(), CONFIG)
    import dataclasses
    original_config = dataclasses.replace(CONFIG, timestep_max_period=10_000.0)
    original = to_dit_original(state, original_config)
    assert original["blocks.1.attn.qkv.weight"].shape == (96, 32) and original["pos_embed"].shape == (1, 16, 32)
    back = _flat(from_dit_original(original, original_config)[1])
    for key, value in _flat(state).items():
        np.testing.assert_array_equal(back[key], value, err_msg=key)
    # original names -> diffusers names by hand (split qkv, copy embedders per block) -> the diffusers outputs
    renamed = {"pos_embed.proj.weight": original["x_embedder.proj.weight"],
               "pos_embed.proj.bias": original["x_embedder.proj.bias"],
               "proj_out_1.weight": original["final_layer.adaLN_modulation.1.weight"],
               "proj_out_1.bias": original["final_layer.adaLN_modulation.1.bias"],
               "proj_out_2.weight": original["final_layer.linear.weight"],
               "proj_out_2.bias": original["final_layer.linear.bias"]}
    for i in range(2):
        b, o = f"transformer_blocks.{i}.", f"blocks.{i}."
        for kind in ("weight", "bias"):
            q, k, v = np.split(original[o + "attn.qkv." + kind], 3)
            renamed.update({b + "attn1.to_q." + kind: q, b + "attn1.to_k." + kind: k, b + "attn1.to_v." + kind: v,
                            b + "attn1.to_out.0." + kind: original[o + "attn.proj." + kind],
                            b + "ff.net.0.proj." + kind: original[o + "mlp.fc1." + kind],
                            b + "ff.net.2." + kind: original[o + "mlp.fc2." + kind],
                            b + "norm1.linear." + kind: original[o + "adaLN_modulation.1." + kind],
                            b + f"norm1.emb.timestep_embedder.linear_1.{kind}": original[f"t_embedder.mlp.0.{kind}"],
                            b + f"norm1.emb.timestep_embedder.linear_2.{kind}": original[f"t_embedder.mlp.2.{kind}"]})
        renamed[b + "norm1.emb.class_embedder.embedding_table.weight"] = original["y_embedder.embedding_table.weight"]
    target = diffusers.DiTTransformer2DModel(**TINY).eval()
    np.testing.assert_array_equal(_torch_out(target, renamed), REFERENCE_OUT)


def test_errors_list_keys_and_refusals():
    state = {k: v.numpy() for k, v in REFERENCE.state_dict().items()}
    bad = dict(state, extra_thing=np.zeros(3, np.float32))
    del bad["proj_out_2.bias"]
    bad["proj_out_1.weight"] = np.zeros((3, 3), np.float32)
    with pytest.raises(ValueError, match=r"proj_out_2.bias.*extra_thing.*proj_out_1.weight: got \(3, 3\), "
                                         r"expected \(64, 32\)"):
        from_diffusers_dit(bad, CONFIG)
    unequal = dict(state)
    unequal["transformer_blocks.1.norm1.emb.class_embedder.embedding_table.weight"] = np.zeros((11, 32), np.float32)
    with pytest.raises(ValueError, match="transformer_blocks.1.norm1.emb.class_embedder.*shares one"):
        from_diffusers_dit(unequal, CONFIG)
    with pytest.raises(ValueError, match="activation_fn"):
        config_from_diffusers(dict(REFERENCE.config, activation_fn="gelu"))
    with pytest.raises(ValueError, match="no config.json"):
        from_diffusers_dit(state)
    import dataclasses
    with pytest.raises(ValueError, match="timestep_max_period"):
        to_dit_original({}, CONFIG)
    with pytest.raises(ValueError, match="attention"):
        to_diffusers_dit({}, dataclasses.replace(CONFIG, attention="linear"))
