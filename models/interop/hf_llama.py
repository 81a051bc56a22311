"""Hugging Face `transformers` Llama checkpoints <-> attnx `LLM` parameters (issue 9).

`from_hf_llama(source)` reads a `save_pretrained` directory (config.json + model.safetensors, a sharded
model-0000x-of-0000y.safetensors set with its index json, or pytorch_model.bin), or an in-memory state dict with a
LlamaConfig-like dict, and returns `(LLMConfig, nnx.State)`; `to_hf_llama(params_or_model, config, out=None)` returns
the HF state dict as numpy arrays and, given `out`, writes config.json + model.safetensors that
`LlamaForCausalLM.from_pretrained(out)` loads.

Conventions checked in code, not assumed:
- RoPE: attnx rotates half-split pairs (feature i with i + H/2, `attnx.rotary`), as HF Llama's `rotate_half` does on
  its own q/k weights, so the projections map without the row permutation HF's Meta-checkpoint script applies.
- RMSNorm: both compute x * rsqrt(mean(x^2) + eps) * scale (models/layers/norm.py); eps comes from rms_norm_eps.
- SwiGLU: attnx keeps gate and up as one [D, 2, F] kernel, index 0 the gate (models/layers/mlp.py).
- Tied embeddings: attnx's `Embed.attend` multiplies logits by 1/sqrt(D) (unit-variance embedding rows), HF does
  not; the final norm only feeds the logits, so its scale carries the factor: attnx final_norm = HF norm * sqrt(D).
Nothing here downloads; torch is imported only to read a pytorch_model.bin.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any, Mapping

import numpy as np
from flax import nnx

from models.interop._common import check_keys, flat_params, param_shapes, state_from_flat, to_numpy
from models.llm import LLM, LLMConfig

__all__ = ["from_hf_llama", "to_hf_llama", "hf_llama_config_to_attnx"]

_SAFETENSORS = "model.safetensors"
_SAFETENSORS_INDEX = "model.safetensors.index.json"
_TORCH_BIN = "pytorch_model.bin"


def _get(hf: Mapping[str, Any], key: str, default: Any = None) -> Any:
    return hf[key] if key in hf and hf[key] is not None else default


def _rope_settings(hf: Mapping[str, Any]) -> tuple[float, str | None]:
    """(theta, unsupported scaling type or None) from either config style: transformers >= 5 keeps
    `rope_parameters` {'rope_theta', 'rope_type', ...}; older configs `rope_theta` + `rope_scaling`."""
    params = _get(hf, "rope_parameters") or {}
    scaling = _get(hf, "rope_scaling") or {}
    theta = _get(params, "rope_theta", _get(hf, "rope_theta", 10_000.0))
    kind = _get(params, "rope_type") or _get(params, "type") or _get(scaling, "rope_type") or _get(scaling, "type")
    return float(theta), (None if kind in (None, "default") else str(kind))


def hf_llama_config_to_attnx(hf: Mapping[str, Any]) -> LLMConfig:
    """A LlamaConfig-like dict -> LLMConfig. Everything attnx cannot represent is refused in one ValueError that
    lists every offending field (rope scaling other than default, biases, activations other than SiLU)."""
    if not isinstance(hf, Mapping):
        raise ValueError(f"hf_config must be a dict (config.json contents), got {type(hf).__name__}")
    problems = []
    model_type = _get(hf, "model_type", "llama")
    if model_type != "llama":
        problems.append(f"model_type={model_type!r} (only 'llama' is converted)")
    theta, scaling = _rope_settings(hf)
    if scaling is not None:
        problems.append(f"rope_scaling/rope_parameters rope_type={scaling!r} (attnx RoPE has no scaling: only "
                        f"'default' is allowed)")
    for flag in ("attention_bias", "mlp_bias"):
        if _get(hf, flag, False):
            problems.append(f"{flag}=True (attnx Llama projections have no bias: only False is allowed)")
    act = _get(hf, "hidden_act", "silu")
    if act not in ("silu", "swish"):
        problems.append(f"hidden_act={act!r} (attnx's SwiGLU MLP uses SiLU: only 'silu' is allowed)")
    missing = [k for k in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                           "intermediate_size") if _get(hf, k) is None]
    if missing:
        problems.append(f"missing fields {missing}")
    if problems:
        raise ValueError("hf_config describes a model attnx's LLM cannot represent: " + "; ".join(problems))
    width, heads = int(hf["hidden_size"]), int(hf["num_attention_heads"])
    return LLMConfig(
        vocab_size=int(hf["vocab_size"]), width=width, depth=int(hf["num_hidden_layers"]), num_heads=heads,
        num_kv_heads=int(_get(hf, "num_key_value_heads", heads)), head_dim=int(_get(hf, "head_dim", width // heads)),
        mlp_width=int(hf["intermediate_size"]), rope_theta=theta, norm_eps=float(_get(hf, "rms_norm_eps", 1e-6)),
        tie_embeddings=bool(_get(hf, "tie_word_embeddings", False)))


def _check_convertible(config: LLMConfig) -> None:
    """attnx options with no Llama counterpart: refused in one message naming each field and its value."""
    plain = LLMConfig()
    problems = [f"{name}={getattr(config, name)!r} (allowed: {getattr(plain, name)!r})"
                for name in ("qk_norm", "qk_head_dim", "use_mlp", "num_value_heads", "query_hidden_dim",
                             "attention", "layer_attention", "representation_embeddings", "parallel_block",
                             "ffn_experts")
                if getattr(config, name) != getattr(plain, name)]
    if problems:
        raise ValueError("config has options a Hugging Face Llama cannot represent: " + "; ".join(problems))


def _head_dim(config: LLMConfig) -> int:
    return config.head_dim or config.width // config.num_heads


def _mlp_width(config: LLMConfig) -> int:
    return config.mlp_width or 64 * math.ceil(8 * config.width / 3 / 64)


def _expected_hf_shapes(config: LLMConfig) -> dict[str, tuple[int, ...]]:
    d, v, h, f = config.width, config.vocab_size, _head_dim(config), _mlp_width(config)
    n, k = config.num_heads, config.num_kv_heads
    shapes = {"model.embed_tokens.weight": (v, d), "model.norm.weight": (d,)}
    for i in range(config.depth):
        p = f"model.layers.{i}."
        shapes |= {p + "self_attn.q_proj.weight": (n * h, d), p + "self_attn.k_proj.weight": (k * h, d),
                   p + "self_attn.v_proj.weight": (k * h, d), p + "self_attn.o_proj.weight": (d, n * h),
                   p + "mlp.gate_proj.weight": (f, d), p + "mlp.up_proj.weight": (f, d),
                   p + "mlp.down_proj.weight": (d, f), p + "input_layernorm.weight": (d,),
                   p + "post_attention_layernorm.weight": (d,)}
    if not config.tie_embeddings:
        shapes["lm_head.weight"] = (v, d)
    return shapes


def _read_directory(path: str) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    config_path = os.path.join(path, "config.json")
    if not os.path.isfile(config_path):
        raise ValueError(f"source={path!r} has no config.json (expected a save_pretrained directory)")
    with open(config_path) as f:
        hf_config = json.load(f)
    if os.path.isfile(os.path.join(path, _SAFETENSORS)):
        files = [_SAFETENSORS]
    elif os.path.isfile(os.path.join(path, _SAFETENSORS_INDEX)):
        with open(os.path.join(path, _SAFETENSORS_INDEX)) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
    elif os.path.isfile(os.path.join(path, _TORCH_BIN)):
        import torch  # only for the legacy pickle format

        state = torch.load(os.path.join(path, _TORCH_BIN), map_location="cpu", weights_only=True)
        return hf_config, {k: to_numpy(v) for k, v in state.items()}
    else:
        raise ValueError(f"source={path!r} has none of {_SAFETENSORS}, {_SAFETENSORS_INDEX}, {_TORCH_BIN}")
    from safetensors.numpy import load_file

    state: dict[str, np.ndarray] = {}
    for name in files:
        try:
            state |= load_file(os.path.join(path, name))
        except TypeError:  # bfloat16 tensors have no numpy dtype: read through torch, then widen
            from safetensors.torch import load_file as load_torch

            state |= {k: to_numpy(v) for k, v in load_torch(os.path.join(path, name)).items()}
    return hf_config, state


def from_hf_llama(source: str | os.PathLike | Mapping[str, Any], hf_config: Mapping[str, Any] | None = None,
                  *, dtype: Any = np.float32) -> tuple[LLMConfig, nnx.State]:
    """A HF Llama checkpoint -> (LLMConfig, nnx.State of the LLM's parameters), cast to `dtype`.

    source: a save_pretrained directory, or a state dict {HF name: numpy array or torch tensor} with `hf_config`
    (the config.json dict or a LlamaConfig). Use as `model = nnx.merge(nnx.graphdef(LLM(config, rngs=nnx.Rngs(0))),
    state)` or `nnx.update(model, state)`. Raises ValueError listing missing, unexpected and wrong-shape keys.
    """
    if isinstance(source, (str, os.PathLike)):
        if hf_config is not None:
            raise ValueError("hf_config must be None when source is a directory (its config.json is read)")
        hf_config, state = _read_directory(os.fspath(source))
    elif isinstance(source, Mapping):
        if hf_config is None:
            raise ValueError("hf_config is required when source is a state dict (the config.json dict)")
        state = {k: to_numpy(v) for k, v in source.items()}
    else:
        raise ValueError(f"source must be a directory path or a state dict, got {type(source).__name__}")
    if hasattr(hf_config, "to_dict"):
        hf_config = hf_config.to_dict()
    config = hf_llama_config_to_attnx(hf_config)
    # A tied checkpoint may still carry lm_head.weight (older transformers); it must equal the embedding.
    ignorable = ("lm_head.weight",) if config.tie_embeddings else ()
    check_keys("state dict", state, _expected_hf_shapes(config), ignorable)
    if config.tie_embeddings and "lm_head.weight" in state and not np.array_equal(
            state["lm_head.weight"], state["model.embed_tokens.weight"]):
        raise ValueError("tie_word_embeddings=True but lm_head.weight differs from model.embed_tokens.weight")
    d, n, k, h = config.width, config.num_heads, config.num_kv_heads, _head_dim(config)

    def w(name):
        return state[name].astype(np.float64)  # exact for float32/bfloat16 inputs; cast once at the end

    flat: dict[str, np.ndarray] = {"embed.embedding_vd": w("model.embed_tokens.weight")}
    final_scale = w("model.norm.weight")
    if config.tie_embeddings:
        final_scale = final_scale * math.sqrt(d)  # see the module docstring: attend() divides by sqrt(D)
    else:
        flat["unembed_dv"] = w("lm_head.weight").T
    flat["final_norm.scale_d"] = final_scale
    for i in range(config.depth):
        p, b = f"model.layers.{i}.", f"blocks.{i}."
        flat[b + "attention.query_dnh"] = w(p + "self_attn.q_proj.weight").T.reshape(d, n, h)
        flat[b + "attention.key_dkh"] = w(p + "self_attn.k_proj.weight").T.reshape(d, k, h)
        flat[b + "attention.value_dkh"] = w(p + "self_attn.v_proj.weight").T.reshape(d, k, h)
        flat[b + "attention.out_nhd"] = w(p + "self_attn.o_proj.weight").T.reshape(n, h, d)
        flat[b + "attention_norm.scale_d"] = w(p + "input_layernorm.weight")
        flat[b + "mlp_norm.scale_d"] = w(p + "post_attention_layernorm.weight")
        flat[b + "mlp.gate_up_d2f"] = np.stack(
            [w(p + "mlp.gate_proj.weight").T, w(p + "mlp.up_proj.weight").T], axis=1)
        flat[b + "mlp.down_fd"] = w(p + "mlp.down_proj.weight").T
    # Placed in the LLM's own parameter tree, so a key mismatch with models/llm.py fails here.
    return config, state_from_flat(lambda: LLM(config, rngs=nnx.Rngs(0)), flat, dtype)


def to_hf_llama(params_or_model: nnx.Module | nnx.State | Mapping, config: LLMConfig,
                out: str | os.PathLike | None = None, *, dtype: Any = np.float32) -> dict[str, np.ndarray]:
    """attnx LLM parameters (the model, or its nnx.State of Params) -> HF Llama state dict {name: numpy array}.

    With `out`, also writes config.json and model.safetensors there for `LlamaForCausalLM.from_pretrained(out)`.
    Raises ValueError for LLMConfig options Llama has no counterpart for, and listing mismatched parameter keys.
    """
    if not isinstance(config, LLMConfig):
        raise ValueError(f"config must be an LLMConfig, got {type(config).__name__}")
    _check_convertible(config)
    params = flat_params(params_or_model)
    check_keys("params", params, param_shapes(lambda: LLM(config, rngs=nnx.Rngs(0))))
    flat = {name: value.astype(np.float64) for name, value in params.items()}
    d, n, k, h = config.width, config.num_heads, config.num_kv_heads, _head_dim(config)
    state = {"model.embed_tokens.weight": flat["embed.embedding_vd"]}
    final_scale = flat["final_norm.scale_d"]
    state["model.norm.weight"] = final_scale / math.sqrt(d) if config.tie_embeddings else final_scale
    if not config.tie_embeddings:
        state["lm_head.weight"] = flat["unembed_dv"].T
    for i in range(config.depth):
        p, b = f"model.layers.{i}.", f"blocks.{i}."
        state[p + "self_attn.q_proj.weight"] = flat[b + "attention.query_dnh"].reshape(d, n * h).T
        state[p + "self_attn.k_proj.weight"] = flat[b + "attention.key_dkh"].reshape(d, k * h).T
        state[p + "self_attn.v_proj.weight"] = flat[b + "attention.value_dkh"].reshape(d, k * h).T
        state[p + "self_attn.o_proj.weight"] = flat[b + "attention.out_nhd"].reshape(n * h, d).T
        state[p + "input_layernorm.weight"] = flat[b + "attention_norm.scale_d"]
        state[p + "post_attention_layernorm.weight"] = flat[b + "mlp_norm.scale_d"]
        gate_up = flat[b + "mlp.gate_up_d2f"]
        state[p + "mlp.gate_proj.weight"] = gate_up[:, 0, :].T
        state[p + "mlp.up_proj.weight"] = gate_up[:, 1, :].T
        state[p + "mlp.down_proj.weight"] = flat[b + "mlp.down_fd"].T
    state = {name: np.ascontiguousarray(v, dtype=dtype) for name, v in state.items()}
    if out is not None:
        _write_directory(os.fspath(out), config, state, dtype)
    return state


def _write_directory(out: str, config: LLMConfig, state: dict[str, np.ndarray], dtype: Any) -> None:
    from safetensors.numpy import save_file

    os.makedirs(out, exist_ok=True)
    hf_config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": config.vocab_size,
        "hidden_size": config.width, "num_hidden_layers": config.depth, "num_attention_heads": config.num_heads,
        "num_key_value_heads": config.num_kv_heads, "head_dim": _head_dim(config),
        "intermediate_size": _mlp_width(config), "hidden_act": "silu", "rms_norm_eps": config.norm_eps,
        "rope_theta": config.rope_theta, "rope_parameters": {"rope_type": "default", "rope_theta": config.rope_theta},
        "tie_word_embeddings": config.tie_embeddings, "attention_bias": False, "mlp_bias": False,
        "max_position_embeddings": 2048, "torch_dtype": np.dtype(dtype).name,
    }
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(hf_config, f, indent=2)
    save_file(state, os.path.join(out, _SAFETENSORS), metadata={"format": "pt"})
