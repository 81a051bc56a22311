"""Hugging Face Llama <-> attnx LLM conversion (models/interop/hf_llama.py, issue 9): logits parity both ways
against `transformers` (random init, tiny configs, float32), exact round trips, and the refusals."""

import dataclasses
import json
import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")

import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from models.interop.hf_llama import from_hf_llama, hf_llama_config_to_attnx, to_hf_llama  # noqa: E402
from models.llm import LLM, LLMConfig  # noqa: E402

TOKENS = np.array([[1, 5, 9, 63, 0, 17, 33, 2, 40, 8, 11], [3, 3, 60, 7, 22, 50, 1, 0, 13, 29, 44]], np.int32)
# (rope_theta, tied): both thetas and both embedding modes, in two models to keep the CPU cost down.
CASES = [(10_000.0, False), (500_000.0, True)]


def _hf_model(theta, tied, seed=0):
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=64, rope_theta=theta, tie_word_embeddings=tied, rms_norm_eps=1e-5,
        max_position_embeddings=64)
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():  # HF initialises norm weights to 1: randomise them so the norm mapping is exercised
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
    return model


def _hf_logits(model):
    with torch.no_grad():
        return model(torch.tensor(TOKENS, dtype=torch.long)).logits.numpy()


def _attnx_logits(config, state):
    model = nnx.merge(nnx.graphdef(nnx.eval_shape(lambda: LLM(config, rngs=nnx.Rngs(0)))), state)
    return np.asarray(model(jnp.asarray(TOKENS)))


def _flat(state):
    return {k: np.asarray(v.get_value()) for k, v in nnx.to_flat_state(state)}


@pytest.mark.parametrize("theta,tied", CASES)
def test_from_hf_matches_transformers(tmp_path, theta, tied):
    hf = _hf_model(theta, tied)
    hf.save_pretrained(tmp_path)
    config, state = from_hf_llama(tmp_path)
    assert (config.rope_theta, config.tie_embeddings, config.num_kv_heads) == (theta, tied, 2)
    np.testing.assert_allclose(_attnx_logits(config, state), _hf_logits(hf), atol=1e-4, rtol=1e-4)
    # Round trip: the HF state dict out equals the one in; attnx params -> HF -> attnx exactly.
    exported = to_hf_llama(state, config)
    reference = {k: v.numpy() for k, v in hf.state_dict().items()}
    if tied:
        reference.pop("lm_head.weight", None)
    assert exported.keys() == reference.keys()
    for name in exported:
        np.testing.assert_allclose(exported[name], reference[name], rtol=1e-7, atol=0, err_msg=name)
    _, again = from_hf_llama(exported, {**hf.config.to_dict()})
    for key, value in _flat(state).items():
        np.testing.assert_array_equal(_flat(again)[key], value, err_msg=str(key))


@pytest.mark.parametrize("theta,tied", CASES)
def test_to_hf_loads_in_transformers(tmp_path, theta, tied):
    config = LLMConfig(vocab_size=64, width=32, depth=2, num_heads=4, num_kv_heads=2, mlp_width=64,
                       rope_theta=theta, norm_eps=1e-5, tie_embeddings=tied)
    model = LLM(config, rngs=nnx.Rngs(1))
    state = nnx.state(model, nnx.Param)
    exported = to_hf_llama(model, config, out=tmp_path)
    hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path).eval()
    hf_state = hf.state_dict()
    if tied:
        hf_state.pop("lm_head.weight")
    assert set(hf_state) == set(exported)
    tensors = {k: torch.from_numpy(v) for k, v in exported.items()}
    if tied:  # transformers lists the tied head in state_dict(); it is the embedding itself
        tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"]
    hf.load_state_dict(tensors, strict=True)
    np.testing.assert_allclose(_hf_logits(hf), _attnx_logits(config, state), atol=1e-4, rtol=1e-4)
    back_config, back = from_hf_llama(tmp_path)
    assert back_config == dataclasses.replace(config, head_dim=8)  # 0 (derived) comes back explicit
    for key, value in _flat(state).items():
        np.testing.assert_array_equal(_flat(back)[key], value, err_msg=str(key))


def test_sharded_and_bin_checkpoints(tmp_path):
    hf = _hf_model(10_000.0, False, seed=2)
    hf.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    assert os.path.isfile(tmp_path / "sharded" / "model.safetensors.index.json")
    _, sharded = from_hf_llama(tmp_path / "sharded")
    os.makedirs(tmp_path / "bin")
    torch.save(hf.state_dict(), tmp_path / "bin" / "pytorch_model.bin")
    (tmp_path / "bin" / "config.json").write_text(json.dumps(hf.config.to_dict()))
    _, from_bin = from_hf_llama(tmp_path / "bin")
    for key, value in _flat(sharded).items():
        np.testing.assert_array_equal(_flat(from_bin)[key], value, err_msg=str(key))


BASE = dict(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
            intermediate_size=64, model_type="llama")


def test_unrepresentable_configs_list_every_field():
    bad = {**BASE, "rope_scaling": {"rope_type": "llama3", "factor": 8.0}, "attention_bias": True,
           "mlp_bias": True, "hidden_act": "gelu"}
    with pytest.raises(ValueError) as error:
        hf_llama_config_to_attnx(bad)
    for field in ("rope_type='llama3'", "attention_bias=True", "mlp_bias=True", "hidden_act='gelu'"):
        assert field in str(error.value)
    with pytest.raises(ValueError, match="rope_type='linear'"):
        hf_llama_config_to_attnx({**BASE, "rope_parameters": {"rope_type": "linear", "rope_theta": 1e4}})
    with pytest.raises(ValueError, match="qk_norm=True"):
        to_hf_llama({}, LLMConfig(qk_norm=True))


def test_mismatched_state_dict_lists_keys():
    config = hf_llama_config_to_attnx(BASE)
    state = to_hf_llama(nnx.state(LLM(config, rngs=nnx.Rngs(0)), nnx.Param), config)
    state.pop("model.norm.weight")
    state["model.layers.0.self_attn.q_proj.weight"] = np.zeros((8, 32), np.float32)
    state["model.extra.weight"] = np.zeros(3, np.float32)
    with pytest.raises(ValueError) as error:
        from_hf_llama(state, BASE)
    message = str(error.value)
    assert "missing keys ['model.norm.weight']" in message
    assert "unexpected keys ['model.extra.weight']" in message
    assert "model.layers.0.self_attn.q_proj.weight: got (8, 32), expected (32, 32)" in message
